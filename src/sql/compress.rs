//! Compressed request bodies, as ClickHouse's HTTP interface takes them: `Content-Encoding`
//! gzip, deflate (zlib), zstd or lz4 (LZ4 frames, what clickhouse-connect sends inserts with by
//! default). The decoded size is bounded like an uncompressed body (`max_body_size`), so a
//! small compressed body cannot expand without limit.
//!
//! Responses are compressed by tower-http's compression layer (src/apis/sql.rs) when the
//! request sets `enable_http_compression=1`.

use std::io::Read;

use bytes::Bytes;

use crate::core::{Error, ErrorCode, Result};

/// The encodings [`decode`] takes.
pub const REQUEST_ENCODINGS: &str = "gzip, deflate, zstd, lz4";

/// Decode `body` sent with `Content-Encoding: encoding`, producing at most `limit` bytes.
pub fn decode(encoding: &str, body: Bytes, limit: usize) -> Result<Bytes> {
    let enc = encoding.trim().to_ascii_lowercase();
    let reader: Box<dyn Read + '_> = match enc.as_str() {
        "" | "identity" => return Ok(body),
        "gzip" | "x-gzip" => Box::new(flate2::read::MultiGzDecoder::new(&body[..])),
        "deflate" => Box::new(flate2::read::ZlibDecoder::new(&body[..])),
        "zstd" => Box::new(zstd::stream::read::Decoder::new(&body[..]).map_err(|e| bad(&enc, e))?),
        "lz4" => Box::new(lz4_flex::frame::FrameDecoder::new(&body[..])),
        _ => {
            return Err(Error::new(
                ErrorCode::NotImplemented,
                format!(
                    "Content-Encoding '{encoding}' is not supported; send {REQUEST_ENCODINGS} or an uncompressed body"
                ),
            ));
        }
    };
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| bad(&enc, e))?;
    if out.len() > limit {
        return Err(Error::new(
            ErrorCode::RequestTooLarge,
            format!("Request body decompresses to more than {limit} bytes (max_body_size)"),
        ));
    }
    Ok(Bytes::from(out))
}

fn bad(enc: &str, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorCode::BadArguments,
        format!("Cannot decompress the request body ({enc}): {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn round_trips_and_limit() {
        let data = b"INSERT INTO t FORMAT CSV\n1,2\n".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        assert_eq!(decode("gzip", gz.clone(), 1 << 20).unwrap(), &data[..]);
        assert_eq!(
            decode("gzip", gz, 100).unwrap_err().code,
            ErrorCode::RequestTooLarge
        );
        let z = Bytes::from(zstd::encode_all(&data[..], 1).unwrap());
        assert_eq!(decode("zstd", z, 1 << 20).unwrap(), &data[..]);
        let mut l = lz4_flex::frame::FrameEncoder::new(Vec::new());
        l.write_all(&data).unwrap();
        let l = Bytes::from(l.finish().unwrap());
        assert_eq!(decode("lz4", l, 1 << 20).unwrap(), &data[..]);
        assert_eq!(
            decode("br", Bytes::from_static(b"x"), 10).unwrap_err().code,
            ErrorCode::NotImplemented
        );
    }
}
