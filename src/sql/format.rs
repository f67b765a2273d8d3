//! Output formats in ClickHouse's shapes: TabSeparated (default), TabSeparatedWithNames, CSV,
//! CSVWithNames, JSON, JSONCompact, JSONEachRow, JSONCompactEachRow.
//!
//! A format writes into a byte buffer row by row; the caller decides when to flush that buffer
//! to the client, so results stream without being held in memory.

use std::io::Write;

use rusqlite::types::ValueRef;

use crate::core::{Error, ErrorCode, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    TabSeparated,
    TabSeparatedWithNames,
    Csv,
    CsvWithNames,
    Json,
    JsonCompact,
    JsonEachRow,
    JsonCompactEachRow,
    Native,
    RowBinary,
    RowBinaryWithNamesAndTypes,
}

impl Format {
    /// Look a format up by its ClickHouse name (case-insensitive; TSV and NDJSON aliases too).
    pub fn parse(name: &str) -> Result<Format> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "tabseparated" | "tsv" => Format::TabSeparated,
            "tabseparatedwithnames" | "tsvwithnames" => Format::TabSeparatedWithNames,
            "csv" => Format::Csv,
            "csvwithnames" => Format::CsvWithNames,
            "json" => Format::Json,
            "jsoncompact" => Format::JsonCompact,
            "jsoneachrow" | "jsonlines" | "ndjson" => Format::JsonEachRow,
            "jsoncompacteachrow" => Format::JsonCompactEachRow,
            "native" => Format::Native,
            "rowbinary" => Format::RowBinary,
            "rowbinarywithnamesandtypes" => Format::RowBinaryWithNamesAndTypes,
            _ => {
                return Err(Error::new(
                    ErrorCode::UnknownFormat,
                    format!(
                        "Unknown format {name}; supported: TabSeparated (TSV), TabSeparatedWithNames, CSV, CSVWithNames, JSON, JSONCompact, JSONEachRow, JSONCompactEachRow, Native, RowBinary, RowBinaryWithNamesAndTypes"
                    ),
                ));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::TabSeparated => "TabSeparated",
            Format::TabSeparatedWithNames => "TabSeparatedWithNames",
            Format::Csv => "CSV",
            Format::CsvWithNames => "CSVWithNames",
            Format::Json => "JSON",
            Format::JsonCompact => "JSONCompact",
            Format::JsonEachRow => "JSONEachRow",
            Format::JsonCompactEachRow => "JSONCompactEachRow",
            Format::Native => "Native",
            Format::RowBinary => "RowBinary",
            Format::RowBinaryWithNamesAndTypes => "RowBinaryWithNamesAndTypes",
        }
    }

    /// Every format (for `system.formats`).
    pub const ALL: &'static [Format] = &[
        Format::TabSeparated,
        Format::TabSeparatedWithNames,
        Format::Csv,
        Format::CsvWithNames,
        Format::Json,
        Format::JsonCompact,
        Format::JsonEachRow,
        Format::JsonCompactEachRow,
        Format::Native,
        Format::RowBinary,
        Format::RowBinaryWithNamesAndTypes,
    ];

    /// ClickHouse's binary formats (bytes, not text).
    pub fn is_binary(self) -> bool {
        matches!(
            self,
            Format::Native | Format::RowBinary | Format::RowBinaryWithNamesAndTypes
        )
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::TabSeparated | Format::TabSeparatedWithNames => {
                "text/tab-separated-values; charset=UTF-8"
            }
            Format::Csv => "text/csv; charset=UTF-8; header=absent",
            Format::CsvWithNames => "text/csv; charset=UTF-8; header=present",
            Format::Json | Format::JsonCompact => "application/json; charset=UTF-8",
            Format::JsonEachRow | Format::JsonCompactEachRow => {
                "application/x-ndjson; charset=UTF-8"
            }
            Format::Native | Format::RowBinary | Format::RowBinaryWithNamesAndTypes => {
                "application/octet-stream"
            }
        }
    }

    pub fn is_json(self) -> bool {
        matches!(
            self,
            Format::Json | Format::JsonCompact | Format::JsonEachRow | Format::JsonCompactEachRow
        )
    }
}

/// Name and ClickHouse-style type of a result column.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub ty: String,
}

/// Type of a column from its declared type (SQLite's affinity rules), or from the first value
/// when there is no declaration (expressions) or the affinity is NUMERIC / BLOB.
pub fn column_type(decl: Option<&str>, first: Option<ValueRef<'_>>) -> String {
    if let Some(d) = decl.map(str::to_ascii_uppercase) {
        if d.contains("INT") {
            return "Int64".into();
        }
        if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
            return "String".into();
        }
        if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
            return "Float64".into();
        }
    }
    match first {
        Some(ValueRef::Integer(_)) => "Int64".into(),
        Some(ValueRef::Real(_)) => "Float64".into(),
        Some(ValueRef::Text(_)) | Some(ValueRef::Blob(_)) => "String".into(),
        Some(ValueRef::Null) | None => "Nullable(Nothing)".into(),
    }
}

/// ClickHouse's type of a literal (the only row of a SELECT without FROM): the narrowest
/// integer type that holds it, as ClickHouse types `SELECT 1` (`UInt8`).
pub fn literal_type(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Integer(i) => match i {
            0..=255 => "UInt8",
            256..=65_535 => "UInt16",
            65_536..=4_294_967_295 => "UInt32",
            4_294_967_296.. => "UInt64",
            -128..=-1 => "Int8",
            -32_768..=-129 => "Int16",
            -2_147_483_648..=-32_769 => "Int32",
            _ => "Int64",
        }
        .into(),
        other => column_type(None, Some(other)),
    }
}

/// Integer types whose values JSON formats never quote (ClickHouse quotes only 64-bit ones).
fn narrow_int(ty: &str) -> bool {
    matches!(
        ty,
        "UInt8" | "UInt16" | "UInt32" | "Int8" | "Int16" | "Int32" | "Bool"
    )
}

/// Counters reported in JSON `statistics` and the summary header.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub elapsed_secs: f64,
    pub rows_read: u64,
    pub bytes_read: u64,
}

/// One result row as the writers read it: SQLite rows, or rows of values converted from
/// another engine (the analytics database).
pub trait RowValues {
    fn value_at(&self, i: usize) -> Result<ValueRef<'_>>;
}

impl RowValues for rusqlite::Row<'_> {
    fn value_at(&self, i: usize) -> Result<ValueRef<'_>> {
        self.get_ref(i).map_err(Error::from)
    }
}

impl RowValues for [rusqlite::types::Value] {
    fn value_at(&self, i: usize) -> Result<ValueRef<'_>> {
        self.get(i)
            .map(ValueRef::from)
            .ok_or_else(|| Error::internal(format!("row has no column {i}")))
    }
}

/// Writes one result set.
pub struct Writer {
    format: Format,
    quote_i64: bool,
    cols: Vec<Column>,
    rows: u64,
    native: Option<super::binary::NativeWriter>,
    row_binary: Option<super::binary::RowBinaryWriter>,
}

impl Writer {
    pub fn new(format: Format, quote_i64: bool) -> Self {
        Writer {
            format,
            quote_i64,
            cols: Vec::new(),
            rows: 0,
            native: None,
            row_binary: None,
        }
    }

    pub fn header(&mut self, cols: Vec<Column>, out: &mut Vec<u8>) {
        self.cols = cols;
        match self.format {
            Format::TabSeparatedWithNames => {
                for (i, c) in self.cols.iter().enumerate() {
                    if i > 0 {
                        out.push(b'\t');
                    }
                    tsv_escape(c.name.as_bytes(), out);
                }
                out.push(b'\n');
            }
            Format::CsvWithNames => {
                for (i, c) in self.cols.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    csv_quote(c.name.as_bytes(), out);
                }
                out.push(b'\n');
            }
            Format::Json | Format::JsonCompact => {
                out.extend_from_slice(b"{\n\t\"meta\":\n\t[");
                for (i, c) in self.cols.iter().enumerate() {
                    out.extend_from_slice(if i > 0 { b",\n\t\t{" } else { b"\n\t\t{" });
                    out.extend_from_slice(b"\n\t\t\t\"name\": ");
                    json_str(c.name.as_bytes(), out);
                    out.extend_from_slice(b",\n\t\t\t\"type\": ");
                    json_str(c.ty.as_bytes(), out);
                    out.extend_from_slice(b"\n\t\t}");
                }
                out.extend_from_slice(b"\n\t],\n\n\t\"data\":\n\t[");
            }
            Format::Native => {
                self.native = Some(super::binary::NativeWriter::new(&self.name_types()));
            }
            Format::RowBinary | Format::RowBinaryWithNamesAndTypes => {
                self.row_binary = Some(super::binary::RowBinaryWriter::new(
                    &self.name_types(),
                    self.format == Format::RowBinaryWithNamesAndTypes,
                    out,
                ));
            }
            _ => {}
        }
    }

    fn name_types(&self) -> Vec<(String, String)> {
        self.cols
            .iter()
            .map(|c| (c.name.clone(), c.ty.clone()))
            .collect()
    }

    pub fn row<R: RowValues + ?Sized>(&mut self, row: &R, out: &mut Vec<u8>) -> Result<u64> {
        let mut bytes = 0u64;
        let n = self.cols.len();
        if self.format.is_binary() {
            let mut get = |i: usize| {
                let v = row.value_at(i)?;
                bytes += value_size(v);
                Ok(v)
            };
            if let Some(w) = self.native.as_mut() {
                w.row(&mut get, out)?;
            } else if let Some(w) = self.row_binary.as_mut() {
                w.row(&mut get, out)?;
            }
            self.rows += 1;
            return Ok(bytes);
        }
        match self.format {
            Format::Json | Format::JsonCompact => {
                out.extend_from_slice(if self.rows > 0 { b",\n\t\t" } else { b"\n\t\t" });
            }
            _ => {}
        }
        let (open, close): (&[u8], &[u8]) = match self.format {
            Format::Json | Format::JsonEachRow => (b"{", b"}"),
            Format::JsonCompact | Format::JsonCompactEachRow => (b"[", b"]"),
            _ => (b"", b""),
        };
        out.extend_from_slice(open);
        for i in 0..n {
            let v = row.value_at(i)?;
            bytes += value_size(v);
            match self.format {
                Format::TabSeparated | Format::TabSeparatedWithNames => {
                    if i > 0 {
                        out.push(b'\t');
                    }
                    tsv_value(v, out);
                }
                Format::Csv | Format::CsvWithNames => {
                    if i > 0 {
                        out.push(b',');
                    }
                    csv_value(v, out);
                }
                Format::Json | Format::JsonEachRow => {
                    if i > 0 {
                        out.push(b',');
                    }
                    json_str(self.cols[i].name.as_bytes(), out);
                    out.push(b':');
                    json_value(v, self.quote_i64 && !narrow_int(&self.cols[i].ty), out);
                }
                Format::JsonCompact | Format::JsonCompactEachRow => {
                    if i > 0 {
                        out.push(b',');
                    }
                    json_value(v, self.quote_i64 && !narrow_int(&self.cols[i].ty), out);
                }
                Format::Native | Format::RowBinary | Format::RowBinaryWithNamesAndTypes => {
                    unreachable!("binary formats return above")
                }
            }
        }
        out.extend_from_slice(close);
        if !matches!(self.format, Format::Json | Format::JsonCompact) {
            out.push(b'\n');
        }
        self.rows += 1;
        Ok(bytes)
    }

    pub fn footer(&mut self, stats: &Stats, out: &mut Vec<u8>) {
        if let Some(w) = self.native.as_mut() {
            w.finish(out);
        }
        if let Format::Json | Format::JsonCompact = self.format {
            let _ = write!(
                out,
                "\n\t],\n\n\t\"rows\": {},\n\n\t\"statistics\":\n\t{{\n\t\t\"elapsed\": {},\n\t\t\"rows_read\": {},\n\t\t\"bytes_read\": {}\n\t}}\n}}\n",
                self.rows, stats.elapsed_secs, stats.rows_read, stats.bytes_read
            );
        }
    }
}

fn value_size(v: ValueRef<'_>) -> u64 {
    match v {
        ValueRef::Null => 1,
        ValueRef::Integer(_) | ValueRef::Real(_) => 8,
        ValueRef::Text(t) | ValueRef::Blob(t) => t.len() as u64,
    }
}

pub(crate) fn float_text(f: f64, out: &mut Vec<u8>) {
    if f.is_nan() {
        out.extend_from_slice(b"nan");
    } else if f.is_infinite() {
        out.extend_from_slice(if f > 0.0 { b"inf" } else { b"-inf" });
    } else {
        let _ = write!(out, "{f}");
    }
}

/// ClickHouse's escaped text form, as TabSeparated writes it.
pub fn tsv_escape(s: &[u8], out: &mut Vec<u8>) {
    for &b in s {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\0' => out.extend_from_slice(b"\\0"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\'' => out.extend_from_slice(b"\\'"),
            _ => out.push(b),
        }
    }
}

fn tsv_value(v: ValueRef<'_>, out: &mut Vec<u8>) {
    match v {
        ValueRef::Null => out.extend_from_slice(b"\\N"),
        ValueRef::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        ValueRef::Real(f) => float_text(f, out),
        ValueRef::Text(t) | ValueRef::Blob(t) => tsv_escape(t, out),
    }
}

fn csv_quote(s: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    for &b in s {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
}

fn csv_value(v: ValueRef<'_>, out: &mut Vec<u8>) {
    match v {
        ValueRef::Null => out.extend_from_slice(b"\\N"),
        ValueRef::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        ValueRef::Real(f) => float_text(f, out),
        ValueRef::Text(t) | ValueRef::Blob(t) => csv_quote(t, out),
    }
}

fn json_value(v: ValueRef<'_>, quote_i64: bool, out: &mut Vec<u8>) {
    match v {
        ValueRef::Null => out.extend_from_slice(b"null"),
        ValueRef::Integer(i) => {
            let _ = if quote_i64 {
                write!(out, "\"{i}\"")
            } else {
                write!(out, "{i}")
            };
        }
        ValueRef::Real(f) if f.is_finite() => {
            let _ = write!(out, "{f}");
        }
        ValueRef::Real(_) => out.extend_from_slice(b"null"),
        ValueRef::Text(t) | ValueRef::Blob(t) => json_str(t, out),
    }
}

/// A JSON string; bytes that are not UTF-8 become U+FFFD (JSON cannot carry raw bytes).
pub fn json_str(s: &[u8], out: &mut Vec<u8>) {
    let text = String::from_utf8_lossy(s);
    out.push(b'"');
    for ch in text.chars() {
        match ch {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(format: Format, sql: &str) -> String {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        let mut st = c.prepare(sql).unwrap();
        let cols: Vec<Column> = st
            .column_names()
            .map(|n| Column {
                name: n.to_string(),
                ty: "String".into(),
            })
            .collect();
        let mut w = Writer::new(format, true);
        let mut out = Vec::new();
        w.header(cols, &mut out);
        let mut rows = st.raw_query();
        while let Some(r) = rows.next().unwrap() {
            w.row(r, &mut out).unwrap();
        }
        w.footer(&Stats::default(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn tsv_escapes_and_nulls() {
        assert_eq!(
            render(Format::TabSeparated, "SELECT 'a\tb', NULL, 1.5, 2"),
            "a\\tb\t\\N\t1.5\t2\n"
        );
    }

    #[test]
    fn csv_quotes() {
        assert_eq!(
            render(Format::CsvWithNames, "SELECT 'x\"y' AS s, 3 AS n"),
            "\"s\",\"n\"\n\"x\"\"y\",3\n"
        );
    }

    #[test]
    fn json_is_valid_and_quotes_int64() {
        let s = render(
            Format::Json,
            "SELECT 1 AS a, 'q\"' AS b UNION ALL SELECT 2, NULL",
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["rows"], 2);
        assert_eq!(v["data"][0]["a"], "1");
        assert_eq!(v["data"][1]["b"], serde_json::Value::Null);
        assert_eq!(
            render(Format::JsonCompactEachRow, "SELECT 1, 'x'"),
            "[\"1\",\"x\"]\n"
        );
    }

    #[test]
    fn unknown_format_named() {
        let e = Format::parse("Parquet").unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownFormat);
        assert!(e.message.contains("Parquet"));
    }
}
