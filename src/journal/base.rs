//! Base images: a database as of one txid, kept under the state directory so
//! snapshots (and a fenced primary's divergent copy) are built from the journal,
//! never by reading the live database while it is written.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::store::{DbHead, Journal, JournalError};
use crate::sqlite::checksum::PageHashes;

/// The base image of `db` at `txid`: the txid is in the name, so switching to a
/// newer base is one journal update, and a crash leaves at worst a stray file.
pub fn base_path(base_dir: &Path, db: &str, txid: u64) -> PathBuf {
    let safe = db.replace('%', "%25").replace('/', "%2F");
    base_dir.join(format!("{safe}@{txid:016x}.base"))
}

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{db}: base image: {source}")]
    Io { db: String, source: std::io::Error },
    #[error("{db}: the journal ends at txid {at}, {to} was needed")]
    Short { db: String, at: u64, to: u64 },
    #[error("{db}: the image at txid {to} has checksum {got:016x}, the journal says {want:016x}")]
    Checksum {
        db: String,
        to: u64,
        got: u64,
        want: u64,
    },
}

/// Write the database as of `to` to `out`: the base image at `h.base_txid`
/// plus the journaled transactions after it, verified against the checksum the
/// journal recorded, and renamed into place only when complete.
pub fn materialize(
    journal: &Journal,
    base_dir: &Path,
    h: &DbHead,
    to: u64,
    out: &Path,
) -> Result<(), BaseError> {
    let io = |source| BaseError::Io {
        db: h.name.clone(),
        source,
    };
    let tmp = out.with_extension("tmp");
    std::fs::copy(base_path(base_dir, &h.name, h.base_txid), &tmp).map_err(io)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&tmp)
        .map_err(io)?;
    let ps = h.page_size as u64;
    let mut at = h.base_txid;
    let mut expect = None;
    while at < to {
        let txns = journal.txns(&h.name, at, to, 64 << 20)?;
        if txns.is_empty() {
            break;
        }
        for t in &txns {
            for (pgno, page) in &t.pages {
                f.write_all_at(page, (*pgno as u64 - 1) * ps).map_err(io)?;
            }
            f.set_len(t.db_size_pages as u64 * ps).map_err(io)?;
            at = t.txid;
            expect = Some(t.post_checksum);
        }
    }
    f.sync_all().map_err(io)?;
    drop(f);
    if at != to {
        let _ = std::fs::remove_file(&tmp);
        return Err(BaseError::Short {
            db: h.name.clone(),
            at,
            to,
        });
    }
    let got = PageHashes::from_file(&tmp, h.page_size)
        .map_err(io)?
        .checksum();
    if let Some(want) = expect.filter(|w| *w != got) {
        let _ = std::fs::remove_file(&tmp);
        return Err(BaseError::Checksum {
            db: h.name.clone(),
            to,
            got,
            want,
        });
    }
    std::fs::rename(&tmp, out).map_err(io)
}
