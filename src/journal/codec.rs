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

// ---------------------------------------------------------------------------
// Segments

/// What the writer of a segment says about it; the rest of the header is
/// derived from the transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentMeta {
    pub db_name: String,
    pub node_id: String,
    pub page_size: u32,
    pub created_ms: i64,
}

/// A decoded segment header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub db_name: String,
    pub node_id: String,
    pub page_size: u32,
    /// Epoch of the last transaction (the highest in the segment).
    pub epoch: u64,
    pub txid_from: u64,
    pub txid_to: u64,
    /// Pre-checksum of `txid_from`, post-checksum of `txid_to`.
    pub pre_checksum: u64,
    pub post_checksum: u64,
    pub created_ms: i64,
    pub txn_count: u32,
    pub page_total: u64,
    pub header_len: u32,
    pub body_len: u64,
    pub raw_len: u64,
}

impl SegmentHeader {
    /// Total object length implied by the header (saturating: `body_len` is
    /// read from the object, and a huge one must read as a length mismatch,
    /// not overflow).
    pub fn object_len(&self) -> u64 {
        u64::from(self.header_len)
            .saturating_add(self.body_len)
            .saturating_add(4)
    }

    /// Checks that this segment continues a chain whose last transaction is
    /// `prev_txid` with post-checksum `prev_checksum` (a previous segment's
    /// `txid_to`/`post_checksum`, or a snapshot's `txid`/`db_checksum`).
    pub fn check_follows(&self, prev_txid: u64, prev_checksum: u64) -> Result<(), CodecError> {
        let expected = prev_txid.wrapping_add(1);
        if self.txid_from != expected {
            return Err(CodecError::ChainGap {
                expected,
                found: self.txid_from,
            });
        }
        if self.pre_checksum != prev_checksum {
            return Err(CodecError::ChecksumChain {
                txid: self.txid_from,
                expected: prev_checksum,
                found: self.pre_checksum,
            });
        }
        Ok(())
    }
}

/// A fully decoded segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub header: SegmentHeader,
    pub txns: Vec<Txn>,
}

/// Encodes `txns` (consecutive, chained, non-empty) as a segment object.
pub fn encode_segment(meta: &SegmentMeta, txns: &[Txn]) -> Result<Vec<u8>, CodecError> {
    if !is_valid_page_size(meta.page_size) {
        return Err(CodecError::BadPageSize(meta.page_size));
    }
    check_name(&meta.db_name, "database name", false)?;
    check_name(&meta.node_id, "node id", true)?;
    check_sequence(txns, meta.page_size)?;
    let pages: usize = txns.iter().map(|t| t.pages.len()).sum();
    if txns.len() > u32::MAX as usize || pages > u32::MAX as usize {
        return Err(CodecError::BadHeader(
            "too many transactions or pages for one segment",
        ));
    }
    encode_segment_unchecked(meta, txns)
}

/// The encoder proper, without validation (tests use it to build well-formed
/// objects with invalid content).
fn encode_segment_unchecked(meta: &SegmentMeta, txns: &[Txn]) -> Result<Vec<u8>, CodecError> {
    let first = txns.first().ok_or(CodecError::EmptySegment)?;
    let last = txns.last().unwrap();
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
    enc.include_checksum(false)?;
    let mut raw_len = 0u64;
    let mut page_total = 0u64;
    for t in txns {
        let mut head = [0u8; TXN_HEAD_LEN];
        head[0..8].copy_from_slice(&t.txid.to_be_bytes());
        head[8..16].copy_from_slice(&t.epoch.to_be_bytes());
        head[16..20].copy_from_slice(&t.db_size_pages.to_be_bytes());
        head[20..28].copy_from_slice(&t.pre_checksum.to_be_bytes());
        head[28..36].copy_from_slice(&t.post_checksum.to_be_bytes());
        head[36..44].copy_from_slice(&t.timestamp_ms.to_be_bytes());
        head[44..48].copy_from_slice(&(t.pages.len() as u32).to_be_bytes());
        enc.write_all(&head)?;
        raw_len += TXN_HEAD_LEN as u64;
        for (pgno, data) in &t.pages {
            let mut ph = [0u8; PAGE_HEAD_LEN];
            ph[0..4].copy_from_slice(&pgno.to_be_bytes());
            ph[4..8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            enc.write_all(&ph)?;
            enc.write_all(data)?;
            raw_len += (PAGE_HEAD_LEN + data.len()) as u64;
        }
        page_total += t.pages.len() as u64;
    }
    let body = enc.finish()?;

    let mut h = Vec::with_capacity(SEGMENT_MAX_HEADER_LEN);
    h.extend_from_slice(SEGMENT_MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    h.extend_from_slice(&[0, 0]); // header length, set by finish_header
    h.extend_from_slice(&meta.page_size.to_be_bytes());
    h.extend_from_slice(&last.epoch.to_be_bytes());
    h.extend_from_slice(&first.txid.to_be_bytes());
    h.extend_from_slice(&last.txid.to_be_bytes());
    h.extend_from_slice(&first.pre_checksum.to_be_bytes());
    h.extend_from_slice(&last.post_checksum.to_be_bytes());
    h.extend_from_slice(&meta.created_ms.to_be_bytes());
    h.extend_from_slice(&(txns.len() as u32).to_be_bytes());
    h.extend_from_slice(&(page_total as u32).to_be_bytes());
    h.extend_from_slice(&(body.len() as u64).to_be_bytes());
    h.extend_from_slice(&raw_len.to_be_bytes());
    debug_assert_eq!(h.len(), SEG_FIXED);
    put_name(&mut h, &meta.db_name);
    put_name(&mut h, &meta.node_id);
    let mut out = finish_header(h);
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    Ok(out)
}

/// Parses and verifies a segment header from a prefix of the object
/// ([`SEGMENT_MAX_HEADER_LEN`] bytes always suffice). Does not look at the
/// body.
pub fn parse_segment_header(bytes: &[u8]) -> Result<SegmentHeader, CodecError> {
    let h = verified_header(bytes, SEGMENT_MAGIC, SEG_FIXED, "segment header")?;
    let (db_name, node_id) = read_names(h, SEG_FIXED)?;
    let hdr = SegmentHeader {
        db_name,
        node_id,
        page_size: be32(h, 12),
        epoch: be64(h, 16),
        txid_from: be64(h, 24),
        txid_to: be64(h, 32),
        pre_checksum: be64(h, 40),
        post_checksum: be64(h, 48),
        created_ms: be64(h, 56) as i64,
        txn_count: be32(h, 64),
        page_total: u64::from(be32(h, 68)),
        body_len: be64(h, 72),
        raw_len: be64(h, 80),
        header_len: h.len() as u32,
    };
    if !is_valid_page_size(hdr.page_size) {
        return Err(CodecError::BadPageSize(hdr.page_size));
    }
    if hdr.txn_count == 0 {
        return Err(CodecError::EmptySegment);
    }
    let span = hdr
        .txid_to
        .checked_sub(hdr.txid_from)
        .and_then(|d| d.checked_add(1));
    if span != Some(u64::from(hdr.txn_count)) {
        return Err(CodecError::BadHeader(
            "txid range does not match the transaction count",
        ));
    }
    if hdr.raw_len > MAX_SEGMENT_RAW_LEN {
        return Err(CodecError::BadHeader("uncompressed body too large"));
    }
    Ok(hdr)
}

/// Decodes and verifies a whole segment: header, length, whole-file CRC, then
/// every transaction and the agreement between header and body.
pub fn decode_segment(bytes: &[u8]) -> Result<Segment, CodecError> {
    let mut r = SegmentReader::new(bytes)?;
    let mut txns = Vec::new();
    for t in &mut r {
        txns.push(t?);
    }
    let header = r.finish()?;
    Ok(Segment { header, txns })
}

/// Counts bytes read through it.
struct Counting<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

/// The decompressor, limited to the declared `raw_len` so that a lying header
/// or a decompression bomb cannot make the reader produce more than that.
type BodyDecoder<'a> = io::Take<zstd::stream::read::Decoder<'a, &'a [u8]>>;

/// Streaming segment decoder: verifies the header and the whole-file CRC up
/// front, then yields transactions one at a time (so restore can stop at any
/// txid and memory stays at one transaction). Call [`SegmentReader::finish`]
/// after the last one to check that header and body agree to the end.
pub struct SegmentReader<'a> {
    header: SegmentHeader,
    body: Counting<BodyDecoder<'a>>,
    index: u64,
    prev: Option<Txn>,
    pages_seen: u64,
    failed: bool,
}

impl<'a> SegmentReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Result<Self, CodecError> {
        let header = parse_segment_header(bytes)?;
        let expected = header.object_len();
        if bytes.len() as u64 != expected {
            return Err(CodecError::LengthMismatch {
                expected,
                actual: bytes.len() as u64,
            });
        }
        let end = bytes.len() - 4;
        let stored = be32(bytes, end);
        let computed = crc32fast::hash(&bytes[..end]);
        if stored != computed {
            return Err(CodecError::Checksum {
                region: Region::File,
                stored,
                computed,
            });
        }
        let body = &bytes[header.header_len as usize..end];
        let mut dec = zstd::stream::read::Decoder::with_buffer(body)
            .map_err(|e| decompress_err(Region::Body, e))?;
        dec.window_log_max(MAX_WINDOW_LOG)
            .map_err(|e| decompress_err(Region::Body, e))?;
        let dec = dec.single_frame().take(header.raw_len);
        Ok(Self {
            header,
            body: Counting { inner: dec, n: 0 },
            index: 0,
            prev: None,
            pages_seen: 0,
            failed: false,
        })
    }

    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), CodecError> {
        let before = self.body.n;
        match self.body.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(CodecError::Truncated {
                what,
                needed: before + buf.len() as u64,
                available: self.body.n,
            }),
            Err(e) => Err(decompress_err(Region::Body, e)),
        }
    }

    fn next_txn(&mut self) -> Result<Txn, CodecError> {
        let mut head = [0u8; TXN_HEAD_LEN];
        self.read_exact(&mut head, "segment body")?;
        let txid = be64(&head, 0);
        let epoch = be64(&head, 8);
        let db_size_pages = be32(&head, 16);
        let pre_checksum = be64(&head, 20);
        let post_checksum = be64(&head, 28);
        let timestamp_ms = be64(&head, 36) as i64;
        let count = be32(&head, 44);
        let ps = self.header.page_size;
        let mut t = Txn {
            txid,
            epoch,
            db_size_pages,
            pre_checksum,
            post_checksum,
            timestamp_ms,
            pages: Vec::new(),
        };
        // Check the links before reading pages: a wrong txid is a more
        // precise error than whatever its pages would produce.
        match &self.prev {
            None => {
                if txid != self.header.txid_from {
                    return Err(CodecError::TxidNotConsecutive {
                        index: 0,
                        expected: self.header.txid_from,
                        found: txid,
                    });
                }
                if pre_checksum != self.header.pre_checksum {
                    return Err(CodecError::HeaderBodyMismatch {
                        field: "pre_checksum",
                        header: self.header.pre_checksum,
                        body: pre_checksum,
                    });
                }
            }
            Some(p) => check_link(self.index, self.header.txid_from, p, &t)?,
        }
        if epoch > self.header.epoch {
            return Err(CodecError::HeaderBodyMismatch {
                field: "epoch",
                header: self.header.epoch,
                body: epoch,
            });
        }
        let mut prev = 0u32;
        for _ in 0..count {
            let mut ph = [0u8; PAGE_HEAD_LEN];
            self.read_exact(&mut ph, "segment body")?;
            let pgno = be32(&ph, 0);
            let len = be32(&ph, 4);
            check_page(txid, pgno, u64::from(len), prev, db_size_pages, ps)?;
            let mut data = vec![0u8; ps as usize];
            self.read_exact(&mut data, "segment body")?;
            t.pages.push((pgno, Bytes::from(data)));
            prev = pgno;
        }
        self.pages_seen += u64::from(count);
        if self.pages_seen > self.header.page_total {
            return Err(CodecError::HeaderBodyMismatch {
                field: "page_total",
                header: self.header.page_total,
                body: self.pages_seen,
            });
        }
        Ok(t)
    }

    /// Checks what the body's end must agree on: transaction and page counts,
    /// last epoch and post-checksum, uncompressed length, nothing after the
    /// compressed frame. Returns the header.
    pub fn finish(mut self) -> Result<SegmentHeader, CodecError> {
        // Drain any transactions the caller did not read.
        while self.index < u64::from(self.header.txn_count) {
            match self.next() {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        // Extra data first: "more transactions than the header says" is the
        // most precise description of a body that goes on.
        let mut probe = [0u8; 1];
        let extra = self
            .body
            .inner
            .get_mut()
            .read(&mut probe)
            .map_err(|e| decompress_err(Region::Body, e))?;
        if extra != 0 {
            return Err(CodecError::BodyContinues {
                txn_count: self.header.txn_count,
            });
        }
        if self.body.n != self.header.raw_len {
            return Err(CodecError::HeaderBodyMismatch {
                field: "raw_len",
                header: self.header.raw_len,
                body: self.body.n,
            });
        }
        let h = &self.header;
        let last = self.prev.as_ref().ok_or(CodecError::EmptySegment)?;
        if last.post_checksum != h.post_checksum {
            return Err(CodecError::HeaderBodyMismatch {
                field: "post_checksum",
                header: h.post_checksum,
                body: last.post_checksum,
            });
        }
        if last.epoch != h.epoch {
            return Err(CodecError::HeaderBodyMismatch {
                field: "epoch",
                header: h.epoch,
                body: last.epoch,
            });
        }
        if self.pages_seen != h.page_total {
            return Err(CodecError::HeaderBodyMismatch {
                field: "page_total",
                header: h.page_total,
                body: self.pages_seen,
            });
        }
        let header = self.header.clone();
        let rest = self.body.inner.into_inner().finish();
        if !rest.is_empty() {
            return Err(CodecError::TrailingBytes {
                what: "segment body",
            });
        }
        Ok(header)
    }
}

impl Iterator for SegmentReader<'_> {
    type Item = Result<Txn, CodecError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.index >= u64::from(self.header.txn_count) {
            return None;
        }
        if self.body.n >= self.header.raw_len {
            self.failed = true;
            return Some(Err(CodecError::HeaderBodyMismatch {
                field: "txn_count",
                header: u64::from(self.header.txn_count),
                body: self.index,
            }));
        }
        match self.next_txn() {
            Ok(t) => {
                self.index += 1;
                self.prev = Some(t.clone());
                Some(Ok(t))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

fn decompress_err(region: Region, e: io::Error) -> CodecError {
    CodecError::Decompress {
        region,
        detail: e.to_string(),
    }
}

// ---------------------------------------------------------------------------
// Snapshots

/// What the writer of a snapshot declares up front (it goes in the header,
/// which comes first) and [`SnapshotWriter::finish`] verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub db_name: String,
    pub node_id: String,
    pub txid: u64,
    pub epoch: u64,
    pub page_size: u32,
    pub page_count: u32,
    /// Whole-database checksum of the image (crate::sqlite::checksum).
    pub db_checksum: u64,
    pub timestamp_ms: i64,
}

/// A decoded snapshot header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub db_name: String,
    pub node_id: String,
    pub txid: u64,
    pub epoch: u64,
    pub page_size: u32,
    pub page_count: u32,
    pub pages_per_frame: u16,
    pub db_checksum: u64,
    pub timestamp_ms: i64,
    pub header_len: u32,
}

impl SnapshotHeader {
    /// Number of frames (groups of `pages_per_frame` pages).
    pub fn frame_count(&self) -> u32 {
        self.page_count.div_ceil(u32::from(self.pages_per_frame))
    }

    /// Length of the object's tail that holds the index and the footer;
    /// computable from the header alone, so it can be fetched with a suffix
    /// range request (`Range: bytes=-N`).
    pub fn index_suffix_len(&self) -> u64 {
        u64::from(self.frame_count()) * INDEX_ENTRY_LEN as u64 + SNAPSHOT_FOOTER_LEN as u64
    }

    /// Byte range of index + footer in an object of `object_len` bytes.
    pub fn index_range(&self, object_len: u64) -> Range<u64> {
        object_len.saturating_sub(self.index_suffix_len())..object_len
    }

    /// The frame holding page `pgno` and the page's slot in it.
    pub fn locate(&self, pgno: u32) -> Result<(u32, u32), CodecError> {
        if pgno == 0 || pgno > self.page_count {
            return Err(CodecError::PageOutOfRange {
                pgno,
                page_count: self.page_count,
            });
        }
        let g = u32::from(self.pages_per_frame);
        Ok(((pgno - 1) / g, (pgno - 1) % g))
    }

    /// Pages in frame `frame` (the last one may be short; 0 past the end).
    fn pages_in_frame(&self, frame: u32) -> u32 {
        let g = u64::from(self.pages_per_frame);
        let first = u64::from(frame) * g;
        (u64::from(self.page_count).saturating_sub(first)).min(g) as u32
    }
}

/// Pages per frame: 64 KiB of uncompressed pages (16 pages of 4 KiB). See
/// docs/FORMAT.md for the trade-off.
pub fn default_pages_per_frame(page_size: u32) -> u16 {
    (65536 / page_size.max(1)).clamp(1, 256) as u16
}

/// One index entry: where a frame is and its CRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub offset: u64,
    pub len: u32,
    pub crc32: u32,
}

/// Writes everything through while computing the whole-file CRC.
struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> CrcWriter<W> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.inner.write_all(b)?;
        self.crc.update(b);
        self.written += b.len() as u64;
        Ok(())
    }
}

/// Streams a database image into the snapshot format: pages go in one at a
/// time in page order and leave compressed in frames, so memory is one frame
/// plus 16 bytes of index per frame whatever the database size.
pub struct SnapshotWriter<W: Write> {
    out: CrcWriter<W>,
    header: SnapshotHeader,
    group: Vec<u8>,
    pages_written: u64,
    xor: u64,
    index: Vec<IndexEntry>,
    compressor: zstd::bulk::Compressor<'static>,
}

impl<W: Write> SnapshotWriter<W> {
    /// Validates `meta` and writes the header.
    pub fn new(out: W, meta: SnapshotMeta) -> Result<Self, CodecError> {
        if !is_valid_page_size(meta.page_size) {
            return Err(CodecError::BadPageSize(meta.page_size));
        }
        check_name(&meta.db_name, "database name", false)?;
        check_name(&meta.node_id, "node id", true)?;
        let ppf = default_pages_per_frame(meta.page_size);
        let mut h = Vec::with_capacity(SNAPSHOT_MAX_HEADER_LEN);
        h.extend_from_slice(SNAPSHOT_MAGIC);
        h.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&meta.page_size.to_be_bytes());
        h.extend_from_slice(&meta.txid.to_be_bytes());
        h.extend_from_slice(&meta.epoch.to_be_bytes());
        h.extend_from_slice(&meta.page_count.to_be_bytes());
        h.extend_from_slice(&ppf.to_be_bytes());
        h.extend_from_slice(&[0, 0]); // reserved
        h.extend_from_slice(&meta.db_checksum.to_be_bytes());
        h.extend_from_slice(&meta.timestamp_ms.to_be_bytes());
        debug_assert_eq!(h.len(), SNAP_FIXED);
        put_name(&mut h, &meta.db_name);
        put_name(&mut h, &meta.node_id);
        let h = finish_header(h);
        let mut out = CrcWriter {
            inner: out,
            crc: crc32fast::Hasher::new(),
            written: 0,
        };
        out.put(&h)?;
        let header = SnapshotHeader {
            db_name: meta.db_name,
            node_id: meta.node_id,
            txid: meta.txid,
            epoch: meta.epoch,
            page_size: meta.page_size,
            page_count: meta.page_count,
            pages_per_frame: ppf,
            db_checksum: meta.db_checksum,
            timestamp_ms: meta.timestamp_ms,
            header_len: h.len() as u32,
        };
        Ok(Self {
            out,
            group: Vec::with_capacity(ppf as usize * meta.page_size as usize),
            header,
            pages_written: 0,
            xor: 0,
            index: Vec::new(),
            compressor: zstd::bulk::Compressor::new(ZSTD_LEVEL)?,
        })
    }

    /// Appends the next page (page 1 first).
    pub fn write_page(&mut self, page: &[u8]) -> Result<(), CodecError> {
        let pgno = self.pages_written + 1;
        if pgno > u64::from(self.header.page_count) {
            return Err(CodecError::PageCountMismatch {
                declared: self.header.page_count,
                written: pgno,
            });
        }
        let pgno = pgno as u32;
        if page.len() != self.header.page_size as usize {
            return Err(CodecError::PageLength {
                txid: self.header.txid,
                pgno,
                len: page.len() as u64,
                page_size: self.header.page_size,
            });
        }
        self.xor ^= page_hash(pgno, page);
        self.group.extend_from_slice(page);
        self.pages_written += 1;
        if self.group.len() == self.group.capacity() || pgno == self.header.page_count {
            self.flush_frame()?;
        }
        Ok(())
    }

    fn flush_frame(&mut self) -> Result<(), CodecError> {
        let frame = self.compressor.compress(&self.group)?;
        self.index.push(IndexEntry {
            offset: self.out.written,
            len: frame.len() as u32,
            crc32: crc32fast::hash(&frame),
        });
        self.out.put(&frame)?;
        self.group.clear();
        Ok(())
    }

    /// Writes index and footer after checking that exactly `page_count`
    /// pages came in and that their checksum is the declared one (a mismatch
    /// means the source changed while it was read). Returns the writer.
    pub fn finish(mut self) -> Result<W, CodecError> {
        if self.pages_written != u64::from(self.header.page_count) {
            return Err(CodecError::PageCountMismatch {
                declared: self.header.page_count,
                written: self.pages_written,
            });
        }
        if self.xor != self.header.db_checksum {
            return Err(CodecError::DbChecksum {
                stored: self.header.db_checksum,
                computed: self.xor,
            });
        }
        let index_offset = self.out.written;
        let mut idx = Vec::with_capacity(self.index.len() * INDEX_ENTRY_LEN);
        for e in &self.index {
            idx.extend_from_slice(&e.offset.to_be_bytes());
            idx.extend_from_slice(&e.len.to_be_bytes());
            idx.extend_from_slice(&e.crc32.to_be_bytes());
        }
        self.out.put(&idx)?;
        let mut footer = Vec::with_capacity(SNAPSHOT_FOOTER_LEN);
        footer.extend_from_slice(&index_offset.to_be_bytes());
        footer.extend_from_slice(&crc32fast::hash(&idx).to_be_bytes());
        footer.extend_from_slice(SNAPSHOT_END_MAGIC);
        self.out.put(&footer)?;
        let crc = self.out.crc.clone().finalize();
        self.out.inner.write_all(&crc.to_be_bytes())?;
        self.out.inner.flush()?;
        Ok(self.out.inner)
    }
}

/// Encodes a whole in-memory image (length a multiple of `meta.page_size`).
pub fn encode_snapshot(meta: SnapshotMeta, image: &[u8]) -> Result<Vec<u8>, CodecError> {
    let ps = meta.page_size as usize;
    if ps == 0 || !image.len().is_multiple_of(ps) {
        return Err(CodecError::BadPageSize(meta.page_size));
    }
    let mut w = SnapshotWriter::new(Vec::new(), meta)?;
    for page in image.chunks_exact(ps) {
        w.write_page(page)?;
    }
    w.finish()
}

/// Encodes the database file `image` into a snapshot file at `out` (created
/// or truncated), one page at a time: memory is one frame and the index,
/// whatever the database's size, and the bytes are those of
/// [`encode_snapshot`]. Returns the object's length.
pub fn encode_snapshot_file(
    meta: SnapshotMeta,
    image: &Path,
    out: &Path,
) -> Result<u64, CodecError> {
    let ps = meta.page_size as usize;
    let pages = meta.page_count;
    let mut src = io::BufReader::with_capacity(FILE_BUFFER, std::fs::File::open(image)?);
    let dst = io::BufWriter::with_capacity(FILE_BUFFER, std::fs::File::create(out)?);
    let mut w = SnapshotWriter::new(dst, meta)?;
    let mut page = vec![0u8; ps];
    for _ in 0..pages {
        src.read_exact(&mut page)?;
        w.write_page(&page)?;
    }
    let f = w.finish()?.into_inner().map_err(|e| e.into_error())?;
    Ok(f.metadata()?.len())
}

/// Buffer of each side of [`encode_snapshot_file`].
const FILE_BUFFER: usize = 1 << 20;

/// Random access to a snapshot through range reads: parse the header from a
/// prefix, the index from the suffix, then fetch and decode single frames.
#[derive(Debug, Clone)]
pub struct SnapshotReader {
    header: SnapshotHeader,
    index: Vec<IndexEntry>,
    index_offset: u64,
}

impl SnapshotReader {
    /// Parses and verifies the header from a prefix of the object
    /// ([`SNAPSHOT_MAX_HEADER_LEN`] bytes always suffice).
    pub fn parse_header(bytes: &[u8]) -> Result<SnapshotHeader, CodecError> {
        let h = verified_header(bytes, SNAPSHOT_MAGIC, SNAP_FIXED, "snapshot header")?;
        let (db_name, node_id) = read_names(h, SNAP_FIXED)?;
        let hdr = SnapshotHeader {
            db_name,
            node_id,
            page_size: be32(h, 12),
            txid: be64(h, 16),
            epoch: be64(h, 24),
            page_count: be32(h, 32),
            pages_per_frame: be16(h, 36),
            db_checksum: be64(h, 40),
            timestamp_ms: be64(h, 48) as i64,
            header_len: h.len() as u32,
        };
        if !is_valid_page_size(hdr.page_size) {
            return Err(CodecError::BadPageSize(hdr.page_size));
        }
        if be16(h, 38) != 0 {
            return Err(CodecError::BadHeader("reserved field is not zero"));
        }
        let raw = u64::from(hdr.pages_per_frame) * u64::from(hdr.page_size);
        if hdr.pages_per_frame == 0 || raw > MAX_FRAME_RAW_LEN {
            return Err(CodecError::BadHeader("pages per frame out of range"));
        }
        Ok(hdr)
    }

    /// Builds a reader from the header and the object's last
    /// [`SnapshotHeader::index_suffix_len`] bytes (index + footer), verifying
    /// the footer, the index CRC and that the frames tile the object.
    pub fn new(header: SnapshotHeader, suffix: &[u8]) -> Result<Self, CodecError> {
        let want = header.index_suffix_len();
        if (suffix.len() as u64) < want {
            return Err(CodecError::Truncated {
                what: "snapshot index",
                needed: want,
                available: suffix.len() as u64,
            });
        }
        let suffix = &suffix[suffix.len() - want as usize..];
        let (idx, footer) = suffix.split_at(suffix.len() - SNAPSHOT_FOOTER_LEN);
        if &footer[12..20] != SNAPSHOT_END_MAGIC {
            return Err(CodecError::BadMagic {
                what: "snapshot footer",
                expected: "MBSNPEND",
                found: footer[12..20].to_vec(),
            });
        }
        let index_offset = be64(footer, 0);
        let stored = be32(footer, 8);
        let computed = crc32fast::hash(idx);
        if stored != computed {
            return Err(CodecError::Checksum {
                region: Region::Index,
                stored,
                computed,
            });
        }
        let mut index = Vec::with_capacity(header.frame_count() as usize);
        let mut expect = u64::from(header.header_len);
        for e in idx.chunks_exact(INDEX_ENTRY_LEN) {
            let entry = IndexEntry {
                offset: be64(e, 0),
                len: be32(e, 8),
                crc32: be32(e, 12),
            };
            if entry.offset != expect || entry.len == 0 {
                return Err(CodecError::BadIndex("its entries do not tile the frames"));
            }
            expect = entry.offset + u64::from(entry.len);
            index.push(entry);
        }
        if expect != index_offset {
            return Err(CodecError::BadIndex(
                "the frames it lists do not end where the footer says it starts",
            ));
        }
        Ok(Self {
            header,
            index,
            index_offset,
        })
    }

    /// Parses a whole object held in memory (header, index, footer; the frames
    /// are verified when decoded).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CodecError> {
        let header = Self::parse_header(bytes)?;
        let r = Self::new(header, bytes)?;
        let expected = r.object_len();
        if bytes.len() as u64 != expected {
            return Err(CodecError::LengthMismatch {
                expected,
                actual: bytes.len() as u64,
            });
        }
        Ok(r)
    }

    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    pub fn index(&self) -> &[IndexEntry] {
        &self.index
    }

    /// Total object length: frames end at the index, then index + footer.
    pub fn object_len(&self) -> u64 {
        self.index_offset + self.header.index_suffix_len()
    }

    /// `(offset, length)` of the frame that holds page `pgno`: one range read
    /// fetches it.
    pub fn page_range(&self, pgno: u32) -> Result<(u64, u32), CodecError> {
        let (frame, _) = self.header.locate(pgno)?;
        let e = self.index[frame as usize];
        Ok((e.offset, e.len))
    }

    /// Verifies and decompresses frame `frame`; returns its pages.
    pub fn decode_frame(&self, frame: u32, frame_bytes: &[u8]) -> Result<Vec<Bytes>, CodecError> {
        let e = *self
            .index
            .get(frame as usize)
            .ok_or(CodecError::PageOutOfRange {
                pgno: frame
                    .saturating_mul(u32::from(self.header.pages_per_frame))
                    .saturating_add(1),
                page_count: self.header.page_count,
            })?;
        if frame_bytes.len() != e.len as usize {
            return Err(CodecError::FrameLength {
                frame,
                expected: u64::from(e.len),
                actual: frame_bytes.len() as u64,
            });
        }
        let computed = crc32fast::hash(frame_bytes);
        if computed != e.crc32 {
            return Err(CodecError::Checksum {
                region: Region::Frame(frame),
                stored: e.crc32,
                computed,
            });
        }
        let ps = self.header.page_size as usize;
        let n = self.header.pages_in_frame(frame) as usize;
        let want = n * ps;
        // Capacity bounded by the header check (<= MAX_FRAME_RAW_LEN).
        let raw = zstd::bulk::decompress(frame_bytes, want)
            .map_err(|e| decompress_err(Region::Frame(frame), e))?;
        if raw.len() != want {
            return Err(CodecError::Decompress {
                region: Region::Frame(frame),
                detail: format!("{} bytes, expected {want}", raw.len()),
            });
        }
        let raw = Bytes::from(raw);
        Ok((0..n).map(|i| raw.slice(i * ps..(i + 1) * ps)).collect())
    }

    /// Verifies and decodes the frame fetched with [`SnapshotReader::page_range`]
    /// and returns page `pgno`.
    pub fn decode_page(&self, frame_bytes: &[u8], pgno: u32) -> Result<Bytes, CodecError> {
        let (frame, slot) = self.header.locate(pgno)?;
        let pages = self.decode_frame(frame, frame_bytes)?;
        Ok(pages[slot as usize].clone())
    }

    /// Verifies a whole object (header, index, every frame, whole-database
    /// checksum, whole-file CRC) while writing the database image to `out`.
    pub fn restore_to<W: Write>(bytes: &[u8], mut out: W) -> Result<SnapshotHeader, CodecError> {
        let r = Self::from_bytes(bytes)?;
        let mut xor = 0u64;
        let mut pgno = 1u32;
        for (k, e) in r.index.iter().enumerate() {
            let s = e.offset as usize;
            let frame = &bytes[s..s + e.len as usize];
            for page in r.decode_frame(k as u32, frame)? {
                xor ^= page_hash(pgno, &page);
                out.write_all(&page)?;
                pgno += 1;
            }
        }
        if xor != r.header.db_checksum {
            return Err(CodecError::DbChecksum {
                stored: r.header.db_checksum,
                computed: xor,
            });
        }
        let end = bytes.len() - 4;
        let stored = be32(bytes, end);
        let computed = crc32fast::hash(&bytes[..end]);
        if stored != computed {
            return Err(CodecError::Checksum {
                region: Region::File,
                stored,
                computed,
            });
        }
        out.flush()?;
        Ok(r.header)
    }
}

/// Fully decodes and verifies a snapshot held in memory; returns its header
/// and the database image.
pub fn decode_snapshot(bytes: &[u8]) -> Result<(SnapshotHeader, Vec<u8>), CodecError> {
    let mut image = Vec::new();
    let h = SnapshotReader::restore_to(bytes, &mut image)?;
    Ok((h, image))
}

#[cfg(test)]
mod tests;
