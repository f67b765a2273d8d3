//! Input formats for `INSERT INTO t [(cols)] FORMAT X` with rows in the body: JSONEachRow,
//! JSONCompactEachRow, CSV, CSVWithNames, TabSeparated, TabSeparatedWithNames.
//!
//! Parsing yields (column names, values) per row; the executor binds them to a prepared
//! `INSERT`. Nothing here touches the database.

use rusqlite::types::Value;
use serde_json::Value as Json;

use super::format::Format;
use super::params::unescape;
use crate::core::{Error, ErrorCode, Result};

fn incorrect(row: usize, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorCode::IncorrectData,
        format!("Cannot parse input row {row}: {why}"),
    )
}

fn json_to_value(v: Json) -> Value {
    match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Integer(b as i64),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::Text(s),
        other => Value::Text(other.to_string()),
    }
}

/// Call `f(columns, values)` for every row of `data`. `columns` is the explicit column list
/// of the INSERT if any; `table_columns` yields the table's columns when a format without
/// names needs them.
pub fn for_each_row(
    format: Format,
    data: &str,
    columns: Option<&[String]>,
    table_columns: &mut dyn FnMut() -> Result<Vec<String>>,
    f: &mut dyn FnMut(&[String], Vec<Value>) -> Result<()>,
) -> Result<u64> {
    let mut n = 0u64;
    match format {
        Format::JsonEachRow => {
            let mut keys: Vec<String> = Vec::new();
            let mut one = |obj: Json, n: &mut u64| -> Result<()> {
                *n += 1;
                let Json::Object(map) = obj else {
                    return Err(incorrect(*n as usize, "expected a JSON object"));
                };
                if map.is_empty() {
                    return Err(incorrect(*n as usize, "empty JSON object"));
                }
                if let Some(allowed) = columns {
                    if let Some(k) = map.keys().find(|k| !allowed.iter().any(|a| a == *k)) {
                        return Err(incorrect(
                            *n as usize,
                            format!("field '{k}' is not in the INSERT's column list"),
                        ));
                    }
                }
                keys.clear();
                keys.extend(map.keys().cloned());
                let vals = map.into_iter().map(|(_, v)| json_to_value(v)).collect();
                f(&keys, vals)
            };
            for item in serde_json::Deserializer::from_str(data).into_iter::<Json>() {
                let v =
                    item.map_err(|e| incorrect(n as usize + 1, format!("invalid JSON: {e}")))?;
                match v {
                    Json::Array(items) => {
                        for obj in items {
                            one(obj, &mut n)?;
                        }
                    }
                    obj => one(obj, &mut n)?,
                }
            }
        }
        Format::JsonCompactEachRow => {
            let cols = match columns {
                Some(c) => c.to_vec(),
                None => table_columns()?,
            };
            for item in serde_json::Deserializer::from_str(data).into_iter::<Json>() {
                n += 1;
                let v = item.map_err(|e| incorrect(n as usize, format!("invalid JSON: {e}")))?;
                let Json::Array(vals) = v else {
                    return Err(incorrect(n as usize, "expected a JSON array"));
                };
                if vals.len() != cols.len() {
                    return Err(incorrect(
                        n as usize,
                        format!("{} values for {} columns", vals.len(), cols.len()),
                    ));
                }
                f(&cols, vals.into_iter().map(json_to_value).collect())?;
            }
        }
        Format::Csv | Format::CsvWithNames => {
            let mut rdr = csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .from_reader(data.as_bytes());
            let mut cols: Option<Vec<String>> = match (format, columns) {
                (Format::CsvWithNames, _) => None,
                (_, Some(c)) => Some(c.to_vec()),
                _ => Some(table_columns()?),
            };
            for rec in rdr.records() {
                let rec = rec.map_err(|e| incorrect(n as usize + 1, e))?;
                let Some(cols) = cols.as_ref() else {
                    cols = Some(rec.iter().map(str::to_string).collect());
                    continue;
                };
                n += 1;
                if rec.len() != cols.len() {
                    return Err(incorrect(
                        n as usize,
                        format!("{} fields for {} columns", rec.len(), cols.len()),
                    ));
                }
                let vals = rec
                    .iter()
                    .map(|s| {
                        if s == "\\N" {
                            Value::Null
                        } else {
                            Value::Text(s.to_string())
                        }
                    })
                    .collect();
                f(cols, vals)?;
            }
        }
        Format::TabSeparated | Format::TabSeparatedWithNames => {
            let mut cols: Option<Vec<String>> = match (format, columns) {
                (Format::TabSeparatedWithNames, _) => None,
                (_, Some(c)) => Some(c.to_vec()),
                _ => Some(table_columns()?),
            };
            for line in data.split('\n') {
                let line = line.strip_suffix('\r').unwrap_or(line);
                if line.is_empty() {
                    continue;
                }
                let Some(cols) = cols.as_ref() else {
                    cols = Some(line.split('\t').map(unescape).collect());
                    continue;
                };
                n += 1;
                let fields: Vec<&str> = line.split('\t').collect();
                if fields.len() != cols.len() {
                    return Err(incorrect(
                        n as usize,
                        format!("{} fields for {} columns", fields.len(), cols.len()),
                    ));
                }
                let vals = fields
                    .into_iter()
                    .map(|s| {
                        if s == "\\N" {
                            Value::Null
                        } else {
                            Value::Text(unescape(s))
                        }
                    })
                    .collect();
                f(cols, vals)?;
            }
        }
        Format::Native | Format::RowBinary | Format::RowBinaryWithNamesAndTypes => {
            return Err(Error::internal(format!(
                "{} is binary: its rows are read by sql::binary",
                format.name()
            )));
        }
        Format::Json | Format::JsonCompact => {
            return Err(Error::new(
                ErrorCode::NotImplemented,
                format!(
                    "{} is an output format; insert with JSONEachRow, JSONCompactEachRow, CSV or TabSeparated",
                    format.name()
                ),
            ));
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(
        format: Format,
        data: &str,
        cols: Option<&[String]>,
    ) -> Result<Vec<(Vec<String>, Vec<Value>)>> {
        let mut out = Vec::new();
        for_each_row(
            format,
            data,
            cols,
            &mut || Ok(vec!["a".into(), "b".into()]),
            &mut |c, v| {
                out.push((c.to_vec(), v));
                Ok(())
            },
        )?;
        Ok(out)
    }

    #[test]
    fn json_each_row_and_array() {
        let rows = collect(
            Format::JsonEachRow,
            "{\"a\":1,\"b\":\"x\"}\n{\"b\":null}\n[{\"a\":true}]",
            None,
        )
        .unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].1, vec![Value::Integer(1), Value::Text("x".into())]);
        assert_eq!(rows[1].0, vec!["b".to_string()]);
        assert_eq!(rows[2].1, vec![Value::Integer(1)]);
        assert!(
            collect(Format::JsonEachRow, "{\"a\":1}\n{oops}", None)
                .unwrap_err()
                .message
                .contains("row 2")
        );
    }

    #[test]
    fn csv_and_tsv() {
        let rows = collect(Format::Csv, "1,\"x,y\"\n\\N,z\n", None).unwrap();
        assert_eq!(
            rows[0].1,
            vec![Value::Text("1".into()), Value::Text("x,y".into())]
        );
        assert_eq!(rows[1].1[0], Value::Null);
        let rows = collect(Format::TabSeparatedWithNames, "b\ta\nq\\tr\t\\N\n", None).unwrap();
        assert_eq!(rows[0].0, vec!["b".to_string(), "a".to_string()]);
        assert_eq!(rows[0].1, vec![Value::Text("q\tr".into()), Value::Null]);
        assert!(collect(Format::Csv, "1,2,3\n", None).is_err());
    }
}
