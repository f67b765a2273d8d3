//! Reading SQLite's write-ahead log directly: the header, frames, their cumulative checksums
//! and commit boundaries.
//!
//! Only ever called on the writer thread (inside a write job), so no frame is being appended
//! while we read; we still verify salts and checksums like SQLite's own recovery does and stop
//! at the first frame that does not belong, so stale frames from an earlier WAL generation or
//! a rolled-back spill are never shipped. Knows nothing about LTX or object stores.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

pub const WAL_HEADER: u64 = 32;
const FRAME_HEADER: u64 = 24;

/// A position in the WAL just after a commit frame (or at the header when no frame was read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalPos {
    pub salt1: u32,
    pub salt2: u32,
    /// Byte offset of the next frame; 0 = no WAL header seen yet.
    pub offset: u64,
    /// Cumulative checksum after the frame before `offset`.
    pub ck1: u32,
    pub ck2: u32,
}

/// The header of the WAL file as it is now.
#[derive(Debug, Clone, Copy)]
pub struct WalHeader {
    pub big_endian: bool,
    pub page_size: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub ck1: u32,
    pub ck2: u32,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn checksum(big_endian: bool, mut s1: u32, mut s2: u32, data: &[u8]) -> (u32, u32) {
    for w in data.chunks_exact(8) {
        let (x0, x1) = if big_endian {
            (be32(&w[0..4]), be32(&w[4..8]))
        } else {
            (
                u32::from_le_bytes(w[0..4].try_into().unwrap()),
                u32::from_le_bytes(w[4..8].try_into().unwrap()),
            )
        };
        s1 = s1.wrapping_add(x0).wrapping_add(s2);
        s2 = s2.wrapping_add(x1).wrapping_add(s1);
    }
    (s1, s2)
}

/// Read and check the WAL header; `None` when the file is missing, short or not a valid WAL.
pub fn read_header(path: &Path) -> std::io::Result<Option<WalHeader>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut b = [0u8; 32];
    if f.read_exact(&mut b).is_err() {
        return Ok(None);
    }
    let magic = be32(&b[0..4]);
    if magic & !1 != 0x377f_0682 {
        return Ok(None);
    }
    let big_endian = magic & 1 == 1;
    let (c1, c2) = checksum(big_endian, 0, 0, &b[0..24]);
    if c1 != be32(&b[24..28]) || c2 != be32(&b[28..32]) {
        return Ok(None);
    }
    let ps = be32(&b[8..12]);
    Ok(Some(WalHeader {
        big_endian,
        page_size: if ps == 1 { 65536 } else { ps },
        salt1: be32(&b[16..20]),
        salt2: be32(&b[20..24]),
        ck1: c1,
        ck2: c2,
    }))
}

impl WalHeader {
    /// The position of the first frame of this WAL generation.
    pub fn start(&self) -> WalPos {
        WalPos {
            salt1: self.salt1,
            salt2: self.salt2,
            offset: WAL_HEADER,
            ck1: self.ck1,
            ck2: self.ck2,
        }
    }
}

/// Committed changes found after a position.
#[derive(Debug, Default)]
pub struct Scan {
    /// Newest committed version of each page: page number -> byte offset of its frame data.
    pub pages: BTreeMap<u32, u64>,
    /// Database size in pages after the last commit found (0 = none found).
    pub commit: u32,
    /// Position after the last commit frame found (equal to the start when none).
    pub end: WalPos,
    /// Frames read into committed transactions.
    pub frames: u64,
}

/// Read committed frames from `from` (which must match `hdr`'s salts) to the last valid
/// commit frame.
pub fn scan(path: &Path, hdr: &WalHeader, from: WalPos) -> std::io::Result<Scan> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let ps = hdr.page_size as u64;
    let mut out = Scan {
        end: from,
        ..Default::default()
    };
    let mut pending: BTreeMap<u32, u64> = BTreeMap::new();
    let mut pending_frames = 0u64;
    let (mut c1, mut c2) = (from.ck1, from.ck2);
    let mut off = from.offset;
    f.seek(SeekFrom::Start(off))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, f);
    let mut buf = vec![0u8; (FRAME_HEADER + ps) as usize];
    while off + FRAME_HEADER + ps <= len {
        if reader.read_exact(&mut buf).is_err() {
            break;
        }
        let h = &buf[..FRAME_HEADER as usize];
        if be32(&h[8..12]) != hdr.salt1 || be32(&h[12..16]) != hdr.salt2 {
            break;
        }
        let (n1, n2) = checksum(hdr.big_endian, c1, c2, &h[0..8]);
        let (n1, n2) = checksum(hdr.big_endian, n1, n2, &buf[FRAME_HEADER as usize..]);
        if n1 != be32(&h[16..20]) || n2 != be32(&h[20..24]) {
            break;
        }
        c1 = n1;
        c2 = n2;
        let pgno = be32(&h[0..4]);
        let commit = be32(&h[4..8]);
        pending.insert(pgno, off + FRAME_HEADER);
        pending_frames += 1;
        off += FRAME_HEADER + ps;
        if commit != 0 {
            out.pages.append(&mut pending);
            out.frames += pending_frames;
            pending_frames = 0;
            out.commit = commit;
            out.end = WalPos {
                salt1: hdr.salt1,
                salt2: hdr.salt2,
                offset: off,
                ck1: c1,
                ck2: c2,
            };
        }
    }
    Ok(out)
}

/// Read the page data of a frame found by [`scan`].
pub fn read_page(f: &mut File, data_offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(data_offset))?;
    f.read_exact(buf)
}
