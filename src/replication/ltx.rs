//! The LTX file format (version 3 of superfly/ltx, as written by Litestream v0.5): encoder and
//! streaming decoder.
//!
//! Layout: a 100-byte header, page frames (`pgno u32`, `flags u16 = 1`, `size u32`, an LZ4
//! *block* of the page), a six-byte zero page header, the page index (uvarint triples
//! `pgno, offset, frame size`, a zero terminator and a big-endian `u64` with the index length),
//! and a 16-byte trailer (post-apply database checksum, file checksum). The file checksum is
//! CRC-64/ISO over the header, each page header and size prefix followed by the *uncompressed*
//! page, the zero page header, the index and the post-apply checksum field, with bit 63 set.
//! Like Litestream v0.5 we set `HeaderFlagNoChecksum`: the rolling database checksums are zero
//! and the database is verified with `PRAGMA integrity_check` after a restore instead.
//!
//! Owns the bytes of one file only; it knows nothing about WAL files, object stores or levels.

use std::io::{Read, Write};

use anyhow::{Context, bail, ensure};

pub const MAGIC: &[u8; 4] = b"LTX1";
pub const HEADER_SIZE: usize = 100;
pub const FLAG_NO_CHECKSUM: u32 = 1 << 1;
const PAGE_FLAG_SIZE: u16 = 1;
const CHECKSUM_FLAG: u64 = 1 << 63;

/// CRC-64 with the ISO polynomial, as Go's `hash/crc64` computes it.
#[derive(Clone, Copy)]
pub struct Crc64(u64);

const CRC_TABLE: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u64;
        let mut j = 0;
        while j < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xD800_0000_0000_0000
            } else {
                crc >> 1
            };
            j += 1;
        }
        t[i] = crc;
        i += 1;
    }
    t
};

impl Crc64 {
    pub fn new() -> Self {
        Crc64(0)
    }
    pub fn update(&mut self, data: &[u8]) {
        let mut crc = !self.0;
        for &b in data {
            crc = CRC_TABLE[((crc as u8) ^ b) as usize] ^ (crc >> 8);
        }
        self.0 = !crc;
    }
    pub fn sum(&self) -> u64 {
        self.0
    }
}

impl Default for Crc64 {
    fn default() -> Self {
        Self::new()
    }
}

/// The header of an LTX file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    pub flags: u32,
    pub page_size: u32,
    /// Database size in pages after the file is applied.
    pub commit: u32,
    pub min_txid: u64,
    pub max_txid: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    pub wal_offset: i64,
    pub wal_size: i64,
    pub wal_salt1: u32,
    pub wal_salt2: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..12].copy_from_slice(&self.page_size.to_be_bytes());
        b[12..16].copy_from_slice(&self.commit.to_be_bytes());
        b[16..24].copy_from_slice(&self.min_txid.to_be_bytes());
        b[24..32].copy_from_slice(&self.max_txid.to_be_bytes());
        b[32..40].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        // 40..48: pre-apply checksum, zero with FLAG_NO_CHECKSUM.
        b[48..56].copy_from_slice(&self.wal_offset.to_be_bytes());
        b[56..64].copy_from_slice(&self.wal_size.to_be_bytes());
        b[64..68].copy_from_slice(&self.wal_salt1.to_be_bytes());
        b[68..72].copy_from_slice(&self.wal_salt2.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> anyhow::Result<Header> {
        ensure!(b.len() >= HEADER_SIZE, "LTX file shorter than its header");
        ensure!(&b[0..4] == MAGIC, "not an LTX file (bad magic)");
        let u32_at = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
        let h = Header {
            flags: u32_at(4),
            page_size: u32_at(8),
            commit: u32_at(12),
            min_txid: u64_at(16),
            max_txid: u64_at(24),
            timestamp_ms: u64_at(32) as i64,
            wal_offset: u64_at(48) as i64,
            wal_size: u64_at(56) as i64,
            wal_salt1: u32_at(64),
            wal_salt2: u32_at(68),
        };
        ensure!(
            h.page_size.is_power_of_two() && (512..=65536).contains(&h.page_size),
            "LTX header: invalid page size {}",
            h.page_size
        );
        ensure!(
            h.min_txid >= 1 && h.min_txid <= h.max_txid,
            "LTX header: invalid transaction range {}-{}",
            h.min_txid,
            h.max_txid
        );
        Ok(h)
    }

    /// A snapshot holds every page of the database (its range starts at transaction 1).
    pub fn is_snapshot(&self) -> bool {
        self.min_txid == 1
    }
}

/// The page SQLite never writes (it holds the locking bytes); LTX files must skip it.
pub fn lock_pgno(page_size: u32) -> u32 {
    (0x4000_0000u64 / page_size as u64) as u32 + 1
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Writes one LTX file; pages must be given in ascending page-number order.
pub struct Encoder<W: Write> {
    w: W,
    hash: Crc64,
    n: u64,
    page_size: u32,
    commit: u32,
    prev: u32,
    index: Vec<u8>,
    pages: u32,
}

impl<W: Write> Encoder<W> {
    pub fn new(mut w: W, header: &Header) -> anyhow::Result<Self> {
        let b = header.encode();
        w.write_all(&b)?;
        let mut hash = Crc64::new();
        hash.update(&b);
        Ok(Encoder {
            w,
            hash,
            n: HEADER_SIZE as u64,
            page_size: header.page_size,
            commit: header.commit,
            prev: 0,
            index: Vec::new(),
            pages: 0,
        })
    }

    pub fn page(&mut self, pgno: u32, data: &[u8]) -> anyhow::Result<()> {
        ensure!(
            pgno > self.prev,
            "LTX pages out of order ({} after {})",
            pgno,
            self.prev
        );
        ensure!(
            pgno <= self.commit,
            "page {pgno} beyond the commit size {}",
            self.commit
        );
        ensure!(data.len() == self.page_size as usize, "bad page length");
        ensure!(
            pgno != lock_pgno(self.page_size),
            "the lock page is never stored"
        );
        let compressed = lz4_flex::block::compress(data);
        let mut hdr = [0u8; 10];
        hdr[0..4].copy_from_slice(&pgno.to_be_bytes());
        hdr[4..6].copy_from_slice(&PAGE_FLAG_SIZE.to_be_bytes());
        hdr[6..10].copy_from_slice(&(compressed.len() as u32).to_be_bytes());
        self.w.write_all(&hdr)?;
        self.w.write_all(&compressed)?;
        self.hash.update(&hdr);
        self.hash.update(data);
        let offset = self.n;
        let size = 10 + compressed.len() as u64;
        self.n += size;
        put_uvarint(&mut self.index, pgno as u64);
        put_uvarint(&mut self.index, offset);
        put_uvarint(&mut self.index, size);
        self.prev = pgno;
        self.pages += 1;
        Ok(())
    }

    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Write the end of the page block, the index and the trailer; returns the writer.
    pub fn finish(mut self) -> anyhow::Result<W> {
        let zero = [0u8; 6];
        self.w.write_all(&zero)?;
        self.hash.update(&zero);
        let mut idx = std::mem::take(&mut self.index);
        put_uvarint(&mut idx, 0);
        let len = (idx.len() as u64).to_be_bytes();
        self.w.write_all(&idx)?;
        self.w.write_all(&len)?;
        self.hash.update(&idx);
        self.hash.update(&len);
        let post_apply = [0u8; 8];
        self.hash.update(&post_apply);
        self.w.write_all(&post_apply)?;
        let file_checksum = CHECKSUM_FLAG | self.hash.sum();
        self.w.write_all(&file_checksum.to_be_bytes())?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// What a decoded file held besides its pages.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub header: Header,
    pub pages: u32,
}

/// Read a whole LTX file from `r`, calling `on_page(pgno, data)` for every page, and verify
/// its file checksum. Nothing of a file whose checksum fails may be trusted: callers write
/// pages to a scratch file that is thrown away on error.
pub fn decode<R: Read>(
    mut r: R,
    mut on_page: impl FnMut(u32, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<Decoded> {
    let mut hb = [0u8; HEADER_SIZE];
    r.read_exact(&mut hb).context("reading LTX header")?;
    let header = Header::decode(&hb)?;
    let mut hash = Crc64::new();
    hash.update(&hb);
    let ps = header.page_size as usize;
    let mut page = vec![0u8; ps];
    let mut comp = Vec::with_capacity(ps + 64);
    let mut pages = 0u32;
    loop {
        let mut ph = [0u8; 6];
        r.read_exact(&mut ph).context("reading LTX page header")?;
        hash.update(&ph);
        let pgno = u32::from_be_bytes(ph[0..4].try_into().unwrap());
        let flags = u16::from_be_bytes(ph[4..6].try_into().unwrap());
        if pgno == 0 && flags == 0 {
            break;
        }
        ensure!(
            flags == PAGE_FLAG_SIZE,
            "LTX page {pgno}: unsupported page flags {flags:#x} (legacy LZ4 frames are not read)"
        );
        let mut sb = [0u8; 4];
        r.read_exact(&mut sb)?;
        hash.update(&sb);
        let size = u32::from_be_bytes(sb) as usize;
        ensure!(
            size <= ps + ps / 255 + 64,
            "LTX page {pgno}: compressed size {size} is impossible for {ps}-byte pages"
        );
        comp.resize(size, 0);
        r.read_exact(&mut comp)?;
        let n = lz4_flex::block::decompress_into(&comp, &mut page)
            .map_err(|e| anyhow::anyhow!("LTX page {pgno}: bad LZ4 block: {e}"))?;
        ensure!(
            n == ps,
            "LTX page {pgno}: decompressed to {n} bytes, not {ps}"
        );
        hash.update(&page);
        ensure!(
            pgno <= header.commit,
            "LTX page {pgno} beyond commit {}",
            header.commit
        );
        on_page(pgno, &page)?;
        pages += 1;
    }
    // Page index: uvarint triples until a zero page number, then its u64 length.
    let mut idx_len = 0u64;
    let mut zeros_seen = 0;
    loop {
        // read one uvarint
        let mut v: u64 = 0;
        let mut shift = 0;
        loop {
            let mut b = [0u8; 1];
            r.read_exact(&mut b)?;
            hash.update(&b);
            idx_len += 1;
            v |= ((b[0] & 0x7f) as u64) << shift;
            if b[0] & 0x80 == 0 {
                break;
            }
            shift += 7;
            ensure!(shift < 64, "LTX page index: varint too long");
        }
        if zeros_seen % 3 == 0 && v == 0 {
            break;
        }
        zeros_seen += 1;
    }
    let mut lb = [0u8; 8];
    r.read_exact(&mut lb)?;
    hash.update(&lb);
    ensure!(
        u64::from_be_bytes(lb) == idx_len,
        "LTX page index length mismatch"
    );
    let mut tr = [0u8; 16];
    r.read_exact(&mut tr).context("reading LTX trailer")?;
    hash.update(&tr[0..8]);
    let want = u64::from_be_bytes(tr[8..16].try_into().unwrap());
    let got = CHECKSUM_FLAG | hash.sum();
    if want != got {
        bail!("LTX file checksum mismatch (stored {want:016x}, computed {got:016x})");
    }
    Ok(Decoded { header, pages })
}

/// `<min>-<max>.ltx` with 16 hex digits each, as Litestream names them.
pub fn file_name(min: u64, max: u64) -> String {
    format!("{min:016x}-{max:016x}.ltx")
}

/// The transaction range of a file name made by [`file_name`].
pub fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".ltx")?;
    let (a, b) = stem.split_once('-')?;
    if a.len() != 16 || b.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A level-0 file written by Litestream 0.5.17 for a one-row insert (page 2 changed).
    const LITESTREAM_FILE: &str = "4c54583100000002000010000000000400000000000000020000000000000002000001a212fcfea3000000000000000000000000000040800000000000002030bd1b88cd696210620000000000000000000000000000000000000000000000000000000000000002000100000039ff010d000000030ff2000ffc0ff70ff200000200ffffffffffffffffffffffffffffffd8000200f0010000030302010303020201020201020900000000000002644300000000000000000400000000000000008d0cded42a467080";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn decodes_a_file_litestream_wrote() {
        let bytes = unhex(LITESTREAM_FILE);
        let mut seen = vec![];
        let d = decode(&bytes[..], |p, data| {
            seen.push((p, data.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(d.header.min_txid, 2);
        assert_eq!(d.header.flags, FLAG_NO_CHECKSUM);
        assert_eq!(seen, vec![(2, 4096)]);
        // A flipped bit anywhere in the page data breaks the checksum.
        let mut bad = bytes.clone();
        bad[120] ^= 1;
        assert!(decode(&bad[..], |_, _| Ok(())).is_err());
    }

    #[test]
    fn round_trips_and_matches_litestream_bytes_for_the_same_page() {
        let bytes = unhex(LITESTREAM_FILE);
        let mut page = vec![];
        let d = decode(&bytes[..], |_, data| {
            page = data.to_vec();
            Ok(())
        })
        .unwrap();
        let mut h = d.header.clone();
        h.wal_offset = 0x4080;
        let mut enc = Encoder::new(Vec::new(), &h).unwrap();
        enc.page(2, &page).unwrap();
        let out = enc.finish().unwrap();
        let mut again = vec![];
        decode(&out[..], |p, data| {
            again.push((p, data.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(again, vec![(2, page)]);
        assert_eq!(parse_file_name(&file_name(1, 0x2a)), Some((1, 0x2a)));
    }
}
