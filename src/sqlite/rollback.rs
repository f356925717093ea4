//! Rollback-journal (`<db>-journal`) header parsing and commit-point
//! detection for the DELETE, TRUNCATE and PERSIST journal modes.
//!
//! Journal header (pager.c `writeJournalHdr`; big-endian), padded with
//! zeros to the sector size:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `d9 d5 05 f9 20 a1 63 d7` |
//! | 8 | 4 | record count (0xFFFFFFFF: "all records up to EOF", no-sync mode) |
//! | 12 | 4 | checksum nonce |
//! | 16 | 4 | initial database size in pages |
//! | 20 | 4 | sector size |
//! | 24 | 4 | page size |
//!
//! **When the journal is "hot".** With syncing on, SQLite first writes the
//! header with the magic and record count *zeroed*, appends the original page
//! images, syncs, and only then writes the magic and record count (pager.c
//! `syncJournal`) — before its first write to the database file. In no-sync
//! mode the magic is written at once. So the database file is only ever
//! written while the journal at offset 0 starts with the magic.
//!
//! **Commit point.** The transaction commits when the journal stops being hot:
//! it is unlinked (DELETE), truncated to 0 (TRUNCATE, and PERSIST with
//! `journal_size_limit=0`), or its first 28 bytes are overwritten with zeros
//! (PERSIST, and DELETE/TRUNCATE under `locking_mode=EXCLUSIVE`). A rollback
//! ends the same way after restoring the original pages; the pages it wrote
//! back then equal their images before the transaction, so capturing it yields
//! a no-op the caller may drop (compare page hashes). A hot→cold transition
//! with no database write in between is not a transaction.
//!
//! **Size after commit.** Take it from page 1 ([`committed_db_size`]), not
//! from the file: a transaction that shrinks the database truncates the file
//! only after the commit point. Growth happens before it.

use thiserror::Error;

/// The journal magic.
pub const MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];
/// Bytes of the header that carry fields (the rest of the sector is padding).
pub const HEADER_LEN: usize = 28;
/// Record count meaning "every record up to the end of the file".
pub const NREC_UNTIL_EOF: u32 = 0xffff_ffff;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JournalHeaderError {
    #[error("journal header needs {HEADER_LEN} bytes, got {0}")]
    TooShort(usize),
    #[error("journal header has no magic (not hot)")]
    NoMagic,
}

/// A parsed journal header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalHeader {
    pub record_count: u32,
    pub nonce: u32,
    pub initial_db_pages: u32,
    pub sector_size: u32,
    pub page_size: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl JournalHeader {
    /// Parses a header that carries the magic.
    pub fn parse(b: &[u8]) -> Result<Self, JournalHeaderError> {
        if b.len() < HEADER_LEN {
            return Err(JournalHeaderError::TooShort(b.len()));
        }
        if b[..8] != MAGIC {
            return Err(JournalHeaderError::NoMagic);
        }
        Ok(Self {
            record_count: be32(b, 8),
            nonce: be32(b, 12),
            initial_db_pages: be32(b, 16),
            sector_size: be32(b, 20),
            page_size: be32(b, 24),
        })
    }
}

/// True when `first_bytes` (the journal's bytes from offset 0; 8 suffice)
/// start with the magic: SQLite may write the database file, and a crash now
/// would make SQLite roll the journal back.
pub fn is_hot_header(first_bytes: &[u8]) -> bool {
    first_bytes.len() >= MAGIC.len() && first_bytes[..MAGIC.len()] == MAGIC
}

/// True if a write at `offset` of `len` bytes to the journal can change
/// whether it is hot (it touches the magic), so the caller should re-read the
/// first 8 bytes and call [`CommitDetector::on_header`].
pub fn write_touches_magic(offset: u64, len: u64) -> bool {
    len > 0 && offset < MAGIC.len() as u64
}

/// The database size in pages at a commit point, read from page 1 (bytes 28
/// and 24/92): every rollback-mode transaction rewrites page 1 with a bumped
/// change counter, so the in-header size is valid. Use it rather than the file
/// length: SQLite truncates a shrunk database file only *after* the commit
/// point (pager.c `pager_end_transaction`), while it still holds the
/// EXCLUSIVE lock. `None` if page 1 is not a database header with a valid size.
pub fn committed_db_size(page1: &[u8]) -> Option<u32> {
    let h = super::header::DbHeader::parse(page1).ok()?;
    h.size_is_valid().then_some(h.size_in_pages)
}

/// What the filesystem saw happen to the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalEvent<'a> {
    /// A write touched the magic; `first_bytes` is the journal from offset 0
    /// after the write (at least 8 bytes, or the whole file if shorter).
    HeaderWritten { first_bytes: &'a [u8] },
    /// The journal was truncated (or extended) to `len` bytes.
    Truncated { len: u64 },
    /// The journal was unlinked (or renamed away).
    Unlinked,
}

/// Whether a journal event ended a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed for the commit protocol.
    None,
    /// The journal became hot: database writes of a transaction may follow.
    BecameHot,
    /// The journal stopped being hot: the transaction committed (or finished
    /// rolling back). Capture the database pages written since `BecameHot`.
    Committed,
}

/// Tracks the journal of one database through its commit protocol.
///
/// The FS layer collects writes to the database file while [`is_hot`] is true
/// and captures them as one transaction at [`Transition::Committed`].
/// Start it with the state of the journal found at mount
/// (`CommitDetector::new(is_hot_header(..))`); a journal already hot at mount
/// belongs to a crashed writer and will be rolled back by SQLite.
///
/// [`is_hot`]: CommitDetector::is_hot
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitDetector {
    hot: bool,
}

impl CommitDetector {
    pub fn new(hot: bool) -> Self {
        Self { hot }
    }

    pub fn is_hot(&self) -> bool {
        self.hot
    }

    pub fn observe(&mut self, ev: JournalEvent<'_>) -> Transition {
        let now_hot = match ev {
            JournalEvent::HeaderWritten { first_bytes } => is_hot_header(first_bytes),
            // Truncation keeping the magic intact does not change hotness.
            JournalEvent::Truncated { len } => self.hot && len >= MAGIC.len() as u64,
            JournalEvent::Unlinked => false,
        };
        let t = match (self.hot, now_hot) {
            (false, true) => Transition::BecameHot,
            (true, false) => Transition::Committed,
            _ => Transition::None,
        };
        self.hot = now_hot;
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: bool) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        if magic {
            h[..8].copy_from_slice(&MAGIC);
        }
        h[8..12].copy_from_slice(&3u32.to_be_bytes());
        h[12..16].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        h[16..20].copy_from_slice(&10u32.to_be_bytes());
        h[20..24].copy_from_slice(&512u32.to_be_bytes());
        h[24..28].copy_from_slice(&4096u32.to_be_bytes());
        h
    }

    #[test]
    fn parse_header() {
        let h = JournalHeader::parse(&header(true)).unwrap();
        assert_eq!(
            h,
            JournalHeader {
                record_count: 3,
                nonce: 0xdead_beef,
                initial_db_pages: 10,
                sector_size: 512,
                page_size: 4096
            }
        );
        assert_eq!(
            JournalHeader::parse(&header(false)),
            Err(JournalHeaderError::NoMagic)
        );
        assert_eq!(
            JournalHeader::parse(&MAGIC),
            Err(JournalHeaderError::TooShort(8))
        );
        assert!(is_hot_header(&MAGIC));
        assert!(!is_hot_header(&MAGIC[..7]));
        assert!(!is_hot_header(&[0; 28]));
    }

    #[test]
    fn detector_transitions() {
        let mut d = CommitDetector::default();
        let cold = header(false);
        let hot = header(true);
        assert_eq!(
            d.observe(JournalEvent::HeaderWritten { first_bytes: &cold }),
            Transition::None
        );
        assert_eq!(
            d.observe(JournalEvent::HeaderWritten { first_bytes: &hot }),
            Transition::BecameHot
        );
        assert_eq!(
            d.observe(JournalEvent::HeaderWritten { first_bytes: &hot }),
            Transition::None
        );
        assert_eq!(
            d.observe(JournalEvent::Truncated { len: 4096 }),
            Transition::None
        );
        assert_eq!(
            d.observe(JournalEvent::HeaderWritten {
                first_bytes: &[0; 28]
            }),
            Transition::Committed
        );
        d.observe(JournalEvent::HeaderWritten { first_bytes: &hot });
        assert_eq!(
            d.observe(JournalEvent::Truncated { len: 0 }),
            Transition::Committed
        );
        d.observe(JournalEvent::HeaderWritten { first_bytes: &hot });
        assert_eq!(d.observe(JournalEvent::Unlinked), Transition::Committed);
        assert_eq!(d.observe(JournalEvent::Unlinked), Transition::None);
        assert!(write_touches_magic(0, 1));
        assert!(write_touches_magic(7, 100));
        assert!(!write_touches_magic(8, 100));
        assert!(!write_touches_magic(0, 0));
    }

    /// Against real SQLite, replaying its exact writes: in every rollback
    /// journal mode the database file is written only while the journal is
    /// hot, and each hot→cold transition ends exactly one transaction whose
    /// database writes, applied in order, reproduce the live file.
    #[test]
    fn real_sqlite_commit_points() {
        use crate::sqlite::testvfs::{Ev, Files, Kind, RecVfs};
        use rusqlite::params;

        let configs = [
            "PRAGMA journal_mode=DELETE;",
            "PRAGMA journal_mode=TRUNCATE;",
            "PRAGMA journal_mode=PERSIST;",
            "PRAGMA journal_mode=PERSIST; PRAGMA journal_size_limit=0;",
            "PRAGMA journal_mode=PERSIST; PRAGMA synchronous=OFF;",
            "PRAGMA journal_mode=DELETE; PRAGMA locking_mode=EXCLUSIVE;",
            "PRAGMA journal_mode=TRUNCATE; PRAGMA synchronous=FULL;",
        ];
        for (i, cfg) in configs.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("r{i}.db"));
            let vfs = RecVfs::register(false);
            let c = vfs.open(&path);
            c.execute_batch(cfg).unwrap();
            let mut txns = 0;
            c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB, n INT)")
                .unwrap();
            txns += 1;
            for k in 0..30 {
                c.execute(
                    "INSERT INTO t(v, n) VALUES (randomblob(?1), ?2)",
                    params![(k * 397) % 5000, k],
                )
                .unwrap();
                txns += 1;
            }
            c.execute("UPDATE t SET n = n * 2 WHERE n % 2 = 0", [])
                .unwrap();
            c.execute("DELETE FROM t WHERE n % 3 = 0", []).unwrap();
            c.execute_batch("CREATE INDEX t_n ON t(n)").unwrap();
            txns += 3;
            // A transaction larger than the cache: SQLite syncs the journal and
            // writes the database mid-transaction, then adds a second header.
            c.execute_batch("PRAGMA cache_size=5; BEGIN").unwrap();
            for k in 0..100 {
                c.execute(
                    "INSERT INTO t(v, n) VALUES (randomblob(900), ?1)",
                    params![k],
                )
                .unwrap();
            }
            c.execute_batch("COMMIT").unwrap();
            txns += 1;
            // The same, rolled back: the playback writes the originals back.
            c.execute_batch("BEGIN").unwrap();
            for k in 0..100 {
                c.execute(
                    "INSERT INTO t(v, n) VALUES (randomblob(900), ?1)",
                    params![k],
                )
                .unwrap();
            }
            c.execute_batch("ROLLBACK").unwrap();
            let rolled_back = 1;
            c.execute_batch("DELETE FROM t WHERE n > 10; VACUUM;")
                .unwrap();
            txns += 2;

            let mut files = Files::default();
            let mut model = Vec::new();
            let mut det = CommitDetector::default();
            let mut pending: Vec<Ev> = Vec::new();
            let mut ends = 0;
            let mut after_commit = false;
            for ev in vfs.take() {
                files.apply(&ev);
                let t = match &ev {
                    Ev::Write {
                        kind: Kind::Journal,
                        offset,
                        data,
                    } => {
                        if write_touches_magic(*offset, data.len() as u64) {
                            let j = files.journal.as_deref().unwrap_or(&[]);
                            det.observe(JournalEvent::HeaderWritten {
                                first_bytes: &j[..j.len().min(8)],
                            })
                        } else {
                            Transition::None
                        }
                    }
                    Ev::Truncate {
                        kind: Kind::Journal,
                        size,
                    } => det.observe(JournalEvent::Truncated { len: *size }),
                    Ev::Delete {
                        kind: Kind::Journal,
                    } => det.observe(JournalEvent::Unlinked),
                    Ev::Truncate {
                        kind: Kind::Db,
                        size,
                    } if !det.is_hot() => {
                        // A shrinking transaction truncates the file after its
                        // commit point, to the size page 1 already announced.
                        assert!(after_commit, "{cfg}: truncate outside a commit");
                        assert_eq!(*size, model.len() as u64, "{cfg}");
                        Transition::None
                    }
                    Ev::Write { kind: Kind::Db, .. } | Ev::Truncate { kind: Kind::Db, .. } => {
                        assert!(
                            det.is_hot(),
                            "{cfg}: database written while the journal is not hot"
                        );
                        pending.push(ev.clone());
                        Transition::None
                    }
                    _ => Transition::None,
                };
                if t == Transition::Committed && !pending.is_empty() {
                    ends += 1;
                    let mut m = Files {
                        db: std::mem::take(&mut model),
                        ..Files::default()
                    };
                    for e in pending.drain(..) {
                        m.apply(&e);
                    }
                    let pages = committed_db_size(&m.db).expect("page 1 announces the size");
                    m.db.resize(pages as usize * 4096, 0);
                    model = m.db;
                }
                after_commit = t == Transition::Committed;
            }
            assert!(pending.is_empty(), "{cfg}: writes left uncommitted");
            assert_eq!(ends, txns + rolled_back, "{cfg}");
            assert!(
                model == std::fs::read(&path).unwrap(),
                "{cfg}: replayed image differs"
            );
        }
    }
}
