//! SQLite on-disk formats: the database header and its read-only rewrite,
//! WAL parsing and commit capture, rollback-journal commit detection, and the
//! whole-database checksum. Pure building blocks: no FUSE, no threads; I/O
//! only through the caller's reader.

pub mod checksum;
pub mod header;
pub mod rollback;
pub mod wal;

#[cfg(test)]
pub(crate) mod testvfs;
