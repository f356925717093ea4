//! The 100-byte database header at the start of page 1, and the rewrite that
//! presents a WAL-mode database to secondary readers in rollback-journal form.
//!
//! All integers are big-endian (SQLite's file format). See SQLITE_NOTES.md.

use thiserror::Error;

/// Length of the database header at the start of page 1.
pub const HEADER_LEN: usize = 100;
/// `"SQLite format 3\0"`.
pub const MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Byte offsets of the header fields membridge reads or rewrites.
pub mod offset {
    pub const PAGE_SIZE: usize = 16;
    pub const WRITE_VERSION: usize = 18;
    pub const READ_VERSION: usize = 19;
    pub const CHANGE_COUNTER: usize = 24;
    pub const SIZE_IN_PAGES: usize = 28;
    pub const SCHEMA_COOKIE: usize = 40;
    pub const VERSION_VALID_FOR: usize = 92;
    pub const SQLITE_VERSION: usize = 96;
}

/// The byte offset SQLite uses as its PENDING lock byte; the page holding it is
/// never written by SQLite (the "lock-byte page").
pub const PENDING_BYTE: u64 = 0x4000_0000;

/// Values of bytes 18/19.
pub const VERSION_ROLLBACK: u8 = 1;
pub const VERSION_WAL: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    #[error("database header needs {HEADER_LEN} bytes, got {0}")]
    TooShort(usize),
    #[error("not a SQLite database (bad magic string)")]
    BadMagic,
    #[error("invalid page size field {0}")]
    BadPageSize(u16),
}

/// The fields of the database header that membridge cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbHeader {
    /// Page size in bytes (the on-disk value 1 decoded to 65536).
    pub page_size: u32,
    pub write_version: u8,
    pub read_version: u8,
    pub change_counter: u32,
    /// In-header database size; trust it only if [`DbHeader::size_is_valid`].
    pub size_in_pages: u32,
    pub schema_cookie: u32,
    pub version_valid_for: u32,
    pub sqlite_version: u32,
}

impl DbHeader {
    /// Parses the first 100 bytes of `page1` (more bytes are ignored).
    pub fn parse(page1: &[u8]) -> Result<Self, HeaderError> {
        let h: &[u8; HEADER_LEN] = page1
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(HeaderError::TooShort(page1.len()))?;
        if &h[..16] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let raw = u16::from_be_bytes([h[16], h[17]]);
        let page_size = decode_page_size(raw).ok_or(HeaderError::BadPageSize(raw))?;
        Ok(Self {
            page_size,
            write_version: h[offset::WRITE_VERSION],
            read_version: h[offset::READ_VERSION],
            change_counter: be32(h, offset::CHANGE_COUNTER),
            size_in_pages: be32(h, offset::SIZE_IN_PAGES),
            schema_cookie: be32(h, offset::SCHEMA_COOKIE),
            version_valid_for: be32(h, offset::VERSION_VALID_FOR),
            sqlite_version: be32(h, offset::SQLITE_VERSION),
        })
    }

    /// True when the database is in WAL mode (bytes 18/19 are 2).
    pub fn is_wal(&self) -> bool {
        self.write_version == VERSION_WAL || self.read_version == VERSION_WAL
    }

    /// SQLite trusts the in-header size only when it is non-zero and the
    /// version-valid-for number equals the change counter.
    pub fn size_is_valid(&self) -> bool {
        self.size_in_pages != 0 && self.version_valid_for == self.change_counter
    }
}

fn be32(h: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
}

/// Decodes the 2-byte page-size field: a power of two in 512..=32768, or 1
/// meaning 65536. Anything else is invalid.
pub fn decode_page_size(raw: u16) -> Option<u32> {
    match raw {
        1 => Some(65536),
        n if n >= 512 && n.is_power_of_two() => Some(u32::from(n)),
        _ => None,
    }
}

/// Encodes a page size as the 2-byte header field (65536 becomes 1).
pub fn encode_page_size(page_size: u32) -> Option<u16> {
    if !is_valid_page_size(page_size) {
        return None;
    }
    Some(if page_size == 65536 {
        1
    } else {
        page_size as u16
    })
}

/// A SQLite page size: a power of two from 512 to 65536.
pub fn is_valid_page_size(page_size: u32) -> bool {
    (512..=65536).contains(&page_size) && page_size.is_power_of_two()
}

/// The page number (1-based) of the lock-byte page for `page_size`: the page
/// that contains byte offset 0x40000000. It exists only in databases larger
/// than 1 GiB, SQLite never writes it, and it reads as zeros.
pub fn lock_byte_page(page_size: u32) -> u32 {
    debug_assert!(is_valid_page_size(page_size));
    (PENDING_BYTE / u64::from(page_size.max(1))) as u32 + 1
}

/// Whether two page-1 images differ at most in the fields a committing pager
/// stamps on its own: the change counter (24..28), the version-valid-for
/// number (92..96) and the library version (96..100). A secondary commits the
/// primary's pages with its own SQLite, which rewrites exactly these; readers
/// in WAL mode never look at them (docs/ARCHITECTURE.md, "Page 1 stamps").
pub fn same_but_stamps(a: &[u8], b: &[u8]) -> bool {
    const STAMPS: [std::ops::Range<usize>; 2] = [
        offset::CHANGE_COUNTER..offset::CHANGE_COUNTER + 4,
        offset::VERSION_VALID_FOR..offset::SQLITE_VERSION + 4,
    ];
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .enumerate()
            .all(|(i, (x, y))| x == y || STAMPS.iter().any(|r| r.contains(&i)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    fn header_of(path: &std::path::Path) -> DbHeader {
        let bytes = std::fs::read(path).unwrap();
        DbHeader::parse(&bytes).unwrap()
    }

    #[test]
    fn page_size_field_roundtrip() {
        assert_eq!(decode_page_size(1), Some(65536));
        assert_eq!(decode_page_size(4096), Some(4096));
        assert_eq!(decode_page_size(512), Some(512));
        assert_eq!(decode_page_size(256), None);
        assert_eq!(decode_page_size(0), None);
        assert_eq!(decode_page_size(3000), None);
        assert_eq!(encode_page_size(65536), Some(1));
        assert_eq!(encode_page_size(1024), Some(1024));
        assert_eq!(encode_page_size(1000), None);
        for shift in 9..=16 {
            let ps = 1u32 << shift;
            assert_eq!(decode_page_size(encode_page_size(ps).unwrap()), Some(ps));
        }
    }

    #[test]
    fn lock_byte_page_numbers() {
        assert_eq!(lock_byte_page(4096), 262_145);
        assert_eq!(lock_byte_page(65536), 16_385);
        assert_eq!(lock_byte_page(512), 2_097_153);
        // The page starts at or before the pending byte and ends after it.
        for shift in 9..=16 {
            let ps = 1u32 << shift;
            let p = u64::from(lock_byte_page(ps));
            assert!((p - 1) * u64::from(ps) <= PENDING_BYTE);
            assert!(p * u64::from(ps) > PENDING_BYTE);
        }
    }

    #[test]
    fn parse_rejects_malformed() {
        assert_eq!(DbHeader::parse(&[0; 50]), Err(HeaderError::TooShort(50)));
        assert_eq!(DbHeader::parse(&[0; 100]), Err(HeaderError::BadMagic));
        let mut h = [0u8; 100];
        h[..16].copy_from_slice(MAGIC);
        h[16..18].copy_from_slice(&300u16.to_be_bytes());
        assert_eq!(DbHeader::parse(&h), Err(HeaderError::BadPageSize(300)));
    }

    /// Pins against real SQLite: page size 65536 is stored as 1, and bytes
    /// 18/19 are 2 in WAL mode and 1 in rollback mode.
    #[test]
    fn real_sqlite_header_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.db");
        let c = Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA page_size=65536; CREATE TABLE t(x); PRAGMA journal_mode=WAL;")
            .unwrap();
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(&raw[16..18], &[0, 1]);
        let h = header_of(&path);
        assert_eq!(h.page_size, 65536);
        assert!(h.is_wal());
        assert_eq!((h.write_version, h.read_version), (2, 2));
        c.execute_batch("PRAGMA journal_mode=DELETE;").unwrap();
        let h = header_of(&path);
        assert_eq!((h.write_version, h.read_version), (1, 1));
        assert!(!h.is_wal());
        assert!(h.size_is_valid());
        assert_eq!(h.size_in_pages as u64 * 65536, raw.len() as u64);
    }

    /// Pins: in rollback mode every writing transaction bumps the change
    /// counter; in WAL mode the counter changes only when page 1 is part of
    /// the transaction (e.g. a schema change), so a plain row update leaves it.
    #[test]
    fn real_sqlite_change_counter_semantics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cc.db");
        let c = Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        let a = header_of(&path).change_counter;
        c.execute_batch("UPDATE t SET x = 2").unwrap();
        let b = header_of(&path).change_counter;
        assert_eq!(b, a + 1);
        let s0 = header_of(&path).schema_cookie;
        c.execute_batch("CREATE TABLE u(y)").unwrap();
        assert_eq!(header_of(&path).schema_cookie, s0 + 1);

        c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;")
            .unwrap();
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        let before = header_of(&path).change_counter;
        c.execute_batch("UPDATE t SET x = 3").unwrap();
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        assert_eq!(header_of(&path).change_counter, before);
        c.execute_batch("CREATE TABLE v(z)").unwrap();
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        let after = header_of(&path);
        assert_eq!(after.change_counter, before + 1);
        assert_eq!(after.version_valid_for, after.change_counter);
    }

    #[test]
    fn stamps_are_the_only_bytes_ignored() {
        let page: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        for i in 0..page.len() {
            let mut other = page.clone();
            other[i] ^= 0xff;
            let stamp = (24..28).contains(&i) || (92..100).contains(&i);
            assert_eq!(same_but_stamps(&page, &other), stamp, "byte {i}");
        }
        assert!(!same_but_stamps(&page, &page[..100]));
    }
}
