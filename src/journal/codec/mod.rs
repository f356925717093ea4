//! Segment and snapshot object formats (docs/FORMAT.md). The byte layouts, checksum
//! definitions and versioning rules are specified in docs/FORMAT.md; this
//! module is their reference implementation.
//!
//! Decoding is defensive: every length is checked against the bytes actually
//! present before it is used, allocations are bounded by input size (never by
//! a header field alone), and every rejection is a typed [`CodecError`] that
//! names what was wrong. Callers add the object key.

use std::fmt;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::Path;

use bytes::Bytes;
use thiserror::Error;

use crate::sqlite::checksum::page_hash;
use crate::sqlite::header::is_valid_page_size;

/// Segment magic.
pub const SEGMENT_MAGIC: &[u8; 8] = b"MBSEG001";
/// Snapshot magic.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"MBSNAP01";
/// End magic in the snapshot footer, just before the whole-file CRC.
pub const SNAPSHOT_END_MAGIC: &[u8; 8] = b"MBSNPEND";
/// Format version written and the only one read.
pub const FORMAT_VERSION: u16 = 1;
/// A prefix of this many bytes always holds a whole segment header.
pub const SEGMENT_MAX_HEADER_LEN: usize = SEG_FIXED + 1 + 255 + 1 + 255 + 4;
/// A prefix of this many bytes always holds a whole snapshot header.
pub const SNAPSHOT_MAX_HEADER_LEN: usize = SNAP_FIXED + 1 + 255 + 1 + 255 + 4;
/// Largest uncompressed segment body accepted (4 GiB), a guard against
/// decompression bombs; the uploader's batches are far smaller.
pub const MAX_SEGMENT_RAW_LEN: u64 = 1 << 32;
/// Snapshot index entry size.
pub const INDEX_ENTRY_LEN: usize = 16;
/// Snapshot footer size: index offset, index CRC, end magic, whole-file CRC.
pub const SNAPSHOT_FOOTER_LEN: usize = 24;
/// Upper bound of the uncompressed size of one snapshot frame.
pub const MAX_FRAME_RAW_LEN: u64 = 1 << 20;
/// zstd level for segments and snapshots: fast, good ratio on b-tree pages.
const ZSTD_LEVEL: i32 = 3;
/// Largest zstd window (log2 bytes) a segment body may ask for. The streaming
/// decoder allocates the window its frame header declares (zstd's default
/// limit is 2^27, 128 MiB) before reading any data, so a few bytes in an
/// object from the bucket could claim it; level 3 writes 2^21 windows, so
/// 2^23 (8 MiB) refuses nothing this format writes.
pub const MAX_WINDOW_LOG: u32 = 23;

const SEG_FIXED: usize = 88;
const SNAP_FIXED: usize = 56;
const TXN_HEAD_LEN: usize = 48;
const PAGE_HEAD_LEN: usize = 8;

/// One committed transaction: the journal's unit, as captured on the primary
/// and shipped in segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Txn {
    pub txid: u64,
    /// Epoch of the lease under which the transaction was written.
    pub epoch: u64,
    /// Database size in pages after the commit.
    pub db_size_pages: u32,
    /// Whole-database checksum before and after applying the transaction.
    pub pre_checksum: u64,
    pub post_checksum: u64,
    pub timestamp_ms: i64,
    /// Page images, strictly ascending page numbers, each `1..=db_size_pages`.
    pub pages: Vec<(u32, Bytes)>,
}

/// Which checksummed part of an object failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    Header,
    /// Segment body (the compressed transactions).
    Body,
    /// Snapshot page index.
    Index,
    /// Snapshot frame (0-based group number).
    Frame(u32),
    /// The whole-object CRC in the last 4 bytes.
    File,
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Region::Header => write!(f, "header"),
            Region::Body => write!(f, "body"),
            Region::Index => write!(f, "page index"),
            Region::Frame(n) => write!(f, "frame {n}"),
            Region::File => write!(f, "whole-file"),
        }
    }
}

/// Why an object was rejected (or could not be written). Each message names
/// the region at fault (header, body, transaction, page index, frame, footer,
/// whole file); the caller names the object (its key).
#[derive(Debug, Error)]
pub enum CodecError {
    #[error("bad magic in the {what}: {found:02x?}, expected {expected:?}")]
    BadMagic {
        /// "segment header", "snapshot header" or "snapshot footer".
        what: &'static str,
        expected: &'static str,
        found: Vec<u8>,
    },
    #[error("unsupported format version {found} in the header (this build reads {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("truncated {what}: needs {needed} bytes, {available} available")]
    Truncated {
        what: &'static str,
        needed: u64,
        available: u64,
    },
    #[error("whole-file length is {actual} bytes, but the header and index say {expected}")]
    LengthMismatch { expected: u64, actual: u64 },
    #[error("frame {frame} is {actual} bytes, but the page index says {expected}")]
    FrameLength {
        frame: u32,
        expected: u64,
        actual: u64,
    },
    #[error("{region} checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        region: Region,
        stored: u32,
        computed: u32,
    },
    #[error("malformed header: {0}")]
    BadHeader(&'static str),
    #[error("malformed page index: {0}")]
    BadIndex(&'static str),
    #[error("invalid page size {0} in the header")]
    BadPageSize(u32),
    #[error("header says {field} is {header}, body has {body}")]
    HeaderBodyMismatch {
        field: &'static str,
        header: u64,
        body: u64,
    },
    #[error(
        "transaction #{index} has txid {found}, expected {expected} (txids must be consecutive)"
    )]
    TxidNotConsecutive {
        index: u64,
        expected: u64,
        found: u64,
    },
    #[error("transaction {txid}: pre-checksum {found:016x} does not continue the previous post-checksum {expected:016x}")]
    ChecksumChain {
        txid: u64,
        expected: u64,
        found: u64,
    },
    #[error("transaction {txid}: epoch {epoch} is lower than the previous {prev}")]
    EpochRegressed { txid: u64, epoch: u64, prev: u64 },
    #[error("transaction {txid}: page number 0")]
    PageZero { txid: u64 },
    #[error("transaction {txid}: page {pgno} has {len} bytes, page size is {page_size}")]
    PageLength {
        txid: u64,
        pgno: u32,
        len: u64,
        page_size: u32,
    },
    #[error(
        "transaction {txid}: page {pgno} follows page {prev}; pages must be strictly ascending"
    )]
    PagesNotAscending { txid: u64, pgno: u32, prev: u32 },
    #[error("transaction {txid}: page {pgno} is beyond the database size of {db_size} pages")]
    PageBeyondDbSize { txid: u64, pgno: u32, db_size: u32 },
    #[error("segment body goes on after the {txn_count} transactions its header announces")]
    BodyContinues { txn_count: u32 },
    #[error("segment has no transactions (header txn_count 0)")]
    EmptySegment,
    #[error("segment continues txid {found}, expected {expected}")]
    ChainGap { expected: u64, found: u64 },
    #[error("{what} in the header must be 1..=255 bytes of UTF-8")]
    BadName { what: &'static str },
    #[error("page {pgno} is outside the snapshot's 1..={page_count}")]
    PageOutOfRange { pgno: u32, page_count: u32 },
    #[error("snapshot declared {declared} pages, {written} written")]
    PageCountMismatch { declared: u32, written: u64 },
    #[error("whole-database checksum mismatch: the header says {stored:016x}, the pages hash to {computed:016x}")]
    DbChecksum { stored: u64, computed: u64 },
    #[error("decompression failed in {region}: {detail}")]
    Decompress { region: Region, detail: String },
    #[error("{what} has trailing bytes")]
    TrailingBytes { what: &'static str },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

// ---------------------------------------------------------------------------
// Small helpers

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn need(what: &'static str, bytes: &[u8], n: usize) -> Result<(), CodecError> {
    if bytes.len() < n {
        return Err(CodecError::Truncated {
            what,
            needed: n as u64,
            available: bytes.len() as u64,
        });
    }
    Ok(())
}

fn check_magic(
    bytes: &[u8],
    magic: &'static [u8; 8],
    what: &'static str,
) -> Result<(), CodecError> {
    let n = bytes.len().min(8);
    if bytes[..n] != magic[..n] {
        return Err(CodecError::BadMagic {
            what,
            expected: std::str::from_utf8(magic).unwrap_or("?"),
            found: bytes[..n].to_vec(),
        });
    }
    need(what, bytes, 8)
}

fn check_name(s: &str, what: &'static str, allow_empty: bool) -> Result<(), CodecError> {
    if s.len() > 255 || (!allow_empty && s.is_empty()) {
        return Err(CodecError::BadName { what });
    }
    Ok(())
}

fn put_name(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Reads the two length-prefixed names that end a header, then its CRC.
/// `b` is the header (`header_len` bytes, CRC already verified).
fn read_names(b: &[u8], fixed: usize) -> Result<(String, String), CodecError> {
    let body = &b[..b.len() - 4];
    let mut at = fixed;
    let mut name = |what: &'static str| -> Result<String, CodecError> {
        let n = *body
            .get(at)
            .ok_or(CodecError::BadHeader("name length outside header"))? as usize;
        let s = body
            .get(at + 1..at + 1 + n)
            .ok_or(CodecError::BadHeader("name outside header"))?;
        at += 1 + n;
        String::from_utf8(s.to_vec()).map_err(|_| CodecError::BadName { what })
    };
    let db = name("database name")?;
    let node = name("node id")?;
    if at != body.len() {
        return Err(CodecError::BadHeader(
            "header length does not match its names",
        ));
    }
    if db.is_empty() {
        return Err(CodecError::BadName {
            what: "database name",
        });
    }
    Ok((db, node))
}

/// Checks magic, version, header length and header CRC; returns the header
/// bytes (CRC included).
fn verified_header<'a>(
    bytes: &'a [u8],
    magic: &'static [u8; 8],
    fixed: usize,
    what: &'static str,
) -> Result<&'a [u8], CodecError> {
    check_magic(bytes, magic, what)?;
    need(what, bytes, 12)?;
    let version = be16(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let hlen = be16(bytes, 10) as usize;
    if hlen < fixed + 2 + 4 || hlen > fixed + 2 + 510 + 4 {
        return Err(CodecError::BadHeader("header length out of range"));
    }
    need(what, bytes, hlen)?;
    let h = &bytes[..hlen];
    let stored = be32(h, hlen - 4);
    let computed = crc32fast::hash(&h[..hlen - 4]);
    if stored != computed {
        return Err(CodecError::Checksum {
            region: Region::Header,
            stored,
            computed,
        });
    }
    Ok(h)
}

fn finish_header(mut h: Vec<u8>) -> Vec<u8> {
    let len = h.len() as u16 + 4;
    h[10..12].copy_from_slice(&len.to_be_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_be_bytes());
    h
}

// ---------------------------------------------------------------------------
// Transactions

impl Txn {
    /// Checks the page list: numbers non-zero, strictly ascending, within the
    /// database size, each page `page_size` bytes.
    pub fn validate(&self, page_size: u32) -> Result<(), CodecError> {
        let mut prev = 0u32;
        for (pgno, data) in &self.pages {
            check_page(
                self.txid,
                *pgno,
                data.len() as u64,
                prev,
                self.db_size_pages,
                page_size,
            )?;
            prev = *pgno;
        }
        Ok(())
    }
}

fn check_page(
    txid: u64,
    pgno: u32,
    len: u64,
    prev: u32,
    db_size: u32,
    page_size: u32,
) -> Result<(), CodecError> {
    if pgno == 0 {
        return Err(CodecError::PageZero { txid });
    }
    if pgno <= prev {
        return Err(CodecError::PagesNotAscending { txid, pgno, prev });
    }
    if pgno > db_size {
        return Err(CodecError::PageBeyondDbSize {
            txid,
            pgno,
            db_size,
        });
    }
    if len != u64::from(page_size) {
        return Err(CodecError::PageLength {
            txid,
            pgno,
            len,
            page_size,
        });
    }
    Ok(())
}

/// Checks a sequence of transactions the way a segment must hold them:
/// consecutive txids, each pre-checksum continuing the previous post-checksum,
/// non-decreasing epochs, valid pages.
fn check_sequence(txns: &[Txn], page_size: u32) -> Result<(), CodecError> {
    let first = txns.first().ok_or(CodecError::EmptySegment)?;
    for (i, t) in txns.iter().enumerate() {
        if i > 0 {
            let p = &txns[i - 1];
            check_link(i as u64, first.txid, p, t)?;
        }
        t.validate(page_size)?;
    }
    Ok(())
}

fn check_link(index: u64, txid_from: u64, prev: &Txn, t: &Txn) -> Result<(), CodecError> {
    let expected = txid_from.wrapping_add(index);
    if t.txid != expected {
        return Err(CodecError::TxidNotConsecutive {
            index,
            expected,
            found: t.txid,
        });
    }
    if t.pre_checksum != prev.post_checksum {
        return Err(CodecError::ChecksumChain {
            txid: t.txid,
            expected: prev.post_checksum,
            found: t.pre_checksum,
        });
    }
    if t.epoch < prev.epoch {
        return Err(CodecError::EpochRegressed {
            txid: t.txid,
            epoch: t.epoch,
            prev: prev.epoch,
        });
    }
    Ok(())
}

mod segment;
mod snapshot;

pub use segment::*;
pub use snapshot::*;

#[cfg(test)]
mod tests;
