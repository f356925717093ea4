//! The local journal: every captured transaction, durable before the write that
//! committed it returns to SQLite, until the bucket and a snapshot cover it.
//!
//! A SQLite database of the daemon's own, in the state directory (never inside
//! the mount). WAL mode with `synchronous=NORMAL`, the same durability SQLite
//! gives claude-mem itself: a committed row survives a daemon or application
//! crash. Pages are stored zstd-compressed.

use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::codec::Txn;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("local journal: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("local journal: {0}")]
    Io(#[from] std::io::Error),
    #[error("local journal: corrupt pages of {db} txid {txid}: {why}")]
    Corrupt { db: String, txid: u64, why: String },
}

pub type Result<T> = std::result::Result<T, JournalError>;

/// A database's row: the head of its history and what has been published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbHead {
    pub name: String,
    pub page_size: u32,
    pub generation: u64,
    pub head_txid: u64,
    pub head_checksum: u64,
    pub size_pages: u32,
    pub uploaded_txid: u64,
    /// Txid of the local base image (the last snapshot taken).
    pub base_txid: u64,
}

pub struct Journal {
    conn: Mutex<Connection>,
}

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dbs(
  name TEXT PRIMARY KEY,
  page_size INTEGER NOT NULL,
  generation INTEGER NOT NULL,
  head_txid INTEGER NOT NULL,
  head_checksum INTEGER NOT NULL,
  size_pages INTEGER NOT NULL,
  uploaded_txid INTEGER NOT NULL,
  base_txid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS txns(
  db TEXT NOT NULL,
  txid INTEGER NOT NULL,
  epoch INTEGER NOT NULL,
  size_pages INTEGER NOT NULL,
  pre INTEGER NOT NULL,
  post INTEGER NOT NULL,
  ts INTEGER NOT NULL,
  page_count INTEGER NOT NULL,
  raw_bytes INTEGER NOT NULL,
  pages BLOB NOT NULL,
  PRIMARY KEY(db, txid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta(
  key TEXT PRIMARY KEY,
  value INTEGER NOT NULL
);
";

/// Keeps the newest epoch in `meta` before transactions are deleted, so the
/// epoch survives pruning (see [`Journal::last_epoch`]).
const KEEP_EPOCH: &str = "INSERT INTO meta(key, value)
  VALUES ('epoch', (SELECT coalesce(max(epoch), 0) FROM txns))
  ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)";

/// zstd's fast mode: the journal is compressed on the committing write's
/// path (a tenth of the daemon's time at level 1), and it is local and short
/// lived; segments are compressed again, harder, when uploaded.
const JOURNAL_ZSTD_LEVEL: i32 = -1;

fn encode_pages(pages: &[(u32, Bytes)]) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::with_capacity(pages.iter().map(|(_, p)| p.len() + 4).sum());
    for (pgno, page) in pages {
        raw.extend_from_slice(&pgno.to_be_bytes());
        raw.extend_from_slice(page);
    }
    // One compression context per thread, reused: creating one per
    // transaction (and clearing its workspace) was a fifth of capture's cost.
    thread_local! {
        static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    ZSTD.with(|z| {
        let mut z = z.borrow_mut();
        let c = match z.as_mut() {
            Some(c) => c,
            None => z.insert(zstd::bulk::Compressor::new(JOURNAL_ZSTD_LEVEL)?),
        };
        c.compress(&raw)
    })
}

fn decode_pages(
    db: &str,
    txid: u64,
    blob: &[u8],
    count: usize,
    raw_len: usize,
) -> Result<Vec<(u32, Bytes)>> {
    let corrupt = |why: String| JournalError::Corrupt {
        db: db.to_string(),
        txid,
        why,
    };
    // One decompression context per thread, as for compression: the
    // uploader reads every transaction back, and creating a context for each
    // was 7 % of a busy primary's CPU.
    thread_local! {
        static UNZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let raw = UNZSTD
        .with(|z| {
            let mut z = z.borrow_mut();
            let d = match z.as_mut() {
                Some(d) => d,
                None => z.insert(zstd::bulk::Decompressor::new()?),
            };
            d.decompress(blob, raw_len)
        })
        .map_err(|e| corrupt(e.to_string()))?;
    if count == 0 || raw.len() != raw_len || !raw_len.is_multiple_of(count) {
        return Err(corrupt(format!("{} bytes for {count} pages", raw.len())));
    }
    let rec = raw_len / count;
    let raw = Bytes::from(raw);
    Ok((0..count)
        .map(|i| {
            let r = raw.slice(i * rec..(i + 1) * rec);
            (u32::from_be_bytes(r[..4].try_into().unwrap()), r.slice(4..))
        })
        .collect())
}

impl Journal {
    pub fn open(path: &Path) -> Result<Journal> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(JournalError::Io(std::io::Error::other(format!(
                "{} was written by a newer membridge (schema {version})",
                path.display()
            ))));
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Journal {
            conn: Mutex::new(conn),
        })
    }

    /// The head of `db` in the journal at `path`, read without creating or
    /// changing anything (`membridge migrate`, `doctor`); `None` when there is
    /// no journal there or it has no row for `db`.
    pub fn peek_head(path: &Path, db: &str) -> Result<Option<DbHead>> {
        if !path.exists() {
            return Ok(None);
        }
        let c = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        c.busy_timeout(std::time::Duration::from_secs(5))?;
        let has_table: i64 = c.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'dbs'",
            [],
            |r| r.get(0),
        )?;
        if has_table == 0 {
            return Ok(None);
        }
        Ok(c.query_row(
            "SELECT name, page_size, generation, head_txid, head_checksum, size_pages,
                    uploaded_txid, base_txid
             FROM dbs WHERE name = ?1",
            [db],
            row_head,
        )
        .optional()?)
    }

    pub fn head(&self, db: &str) -> Result<Option<DbHead>> {
        let c = self.conn.lock().unwrap();
        Ok(c.query_row(
            "SELECT name, page_size, generation, head_txid, head_checksum, size_pages,
                    uploaded_txid, base_txid
             FROM dbs WHERE name = ?1",
            [db],
            row_head,
        )
        .optional()?)
    }

    pub fn heads(&self) -> Result<Vec<DbHead>> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare(
            "SELECT name, page_size, generation, head_txid, head_checksum, size_pages,
                    uploaded_txid, base_txid
             FROM dbs ORDER BY name",
        )?;
        let rows = st.query_map([], row_head)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Start (or restart, as a new generation) a database's history at `head`,
    /// the state its base image holds. Drops transactions of the old generation.
    pub fn start_generation(&self, head: &DbHead) -> Result<()> {
        let mut c = self.conn.lock().unwrap();
        let tx = c.transaction()?;
        tx.execute(KEEP_EPOCH, [])?;
        tx.execute("DELETE FROM txns WHERE db = ?1", [&head.name])?;
        tx.execute("DELETE FROM meta WHERE key = ?1", [aside_key(&head.name)])?;
        tx.execute("DELETE FROM meta WHERE key = ?1", [parent_key(&head.name)])?;
        tx.execute(
            "INSERT OR REPLACE INTO dbs(name, page_size, generation, head_txid, head_checksum,
               size_pages, uploaded_txid, base_txid)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                head.name,
                head.page_size,
                head.generation as i64,
                head.head_txid as i64,
                head.head_checksum as i64,
                head.size_pages,
                head.uploaded_txid as i64,
                head.base_txid as i64,
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Append one captured transaction and advance the head, atomically.
    pub fn append(&self, db: &str, txn: &Txn) -> Result<()> {
        self.append_all(db, std::slice::from_ref(txn))
    }

    /// Append consecutive captured transactions and advance the head, all
    /// in one transaction of the journal (the tailer's batches: one commit
    /// of the journal per look at the WAL, not per transaction).
    pub fn append_all(&self, db: &str, txns: &[Txn]) -> Result<()> {
        let Some(last) = txns.last() else {
            return Ok(());
        };
        let blobs = txns
            .iter()
            .map(|t| encode_pages(&t.pages))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut c = self.conn.lock().unwrap();
        let tx = c.transaction()?;
        for (txn, blob) in txns.iter().zip(blobs) {
            let raw: usize = txn.pages.iter().map(|(_, p)| p.len() + 4).sum();
            tx.prepare_cached(
            "INSERT INTO txns(db, txid, epoch, size_pages, pre, post, ts, page_count, raw_bytes, pages)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?
        .execute(params![
                db,
                txn.txid as i64,
                txn.epoch as i64,
                txn.db_size_pages,
                txn.pre_checksum as i64,
                txn.post_checksum as i64,
                txn.timestamp_ms,
                txn.pages.len() as i64,
                raw as i64,
                blob
            ])?;
        }
        tx.prepare_cached(
            "UPDATE dbs SET head_txid = ?2, head_checksum = ?3, size_pages = ?4 WHERE name = ?1",
        )?
        .execute(params![
            db,
            last.txid as i64,
            last.post_checksum as i64,
            last.db_size_pages
        ])?;
        tx.commit()?;
        Ok(())
    }

    /// Transactions after `after`, in order, until `max_raw_bytes` of page data
    /// (at least one transaction) or `to` inclusive.
    pub fn txns(&self, db: &str, after: u64, to: u64, max_raw_bytes: usize) -> Result<Vec<Txn>> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare_cached(
            "SELECT txid, epoch, size_pages, pre, post, ts, page_count, raw_bytes, pages
             FROM txns WHERE db = ?1 AND txid > ?2 AND txid <= ?3 ORDER BY txid",
        )?;
        let mut rows = st.query(params![db, after as i64, to.min(i64::MAX as u64) as i64])?;
        let mut out = Vec::new();
        let mut total = 0usize;
        while let Some(r) = rows.next()? {
            let txid = r.get::<_, i64>(0)? as u64;
            let raw = r.get::<_, i64>(7)? as usize;
            if !out.is_empty() && total + raw > max_raw_bytes {
                break;
            }
            total += raw;
            let blob: Vec<u8> = r.get(8)?;
            let pages = decode_pages(db, txid, &blob, r.get::<_, i64>(6)? as usize, raw)?;
            out.push(Txn {
                txid,
                epoch: r.get::<_, i64>(1)? as u64,
                db_size_pages: r.get(2)?,
                pre_checksum: r.get::<_, i64>(3)? as u64,
                post_checksum: r.get::<_, i64>(4)? as u64,
                timestamp_ms: r.get(5)?,
                pages,
            });
        }
        Ok(out)
    }

    pub fn mark_uploaded(&self, db: &str, txid: u64) -> Result<()> {
        let c = self.conn.lock().unwrap();
        c.execute(
            "UPDATE dbs SET uploaded_txid = max(uploaded_txid, ?2) WHERE name = ?1",
            params![db, txid as i64],
        )?;
        Ok(())
    }

    /// The base image now holds `txid`: transactions both uploaded and in the
    /// base are no longer needed locally (the bucket keeps them for restore).
    pub fn set_base(&self, db: &str, txid: u64) -> Result<()> {
        let mut c = self.conn.lock().unwrap();
        let tx = c.transaction()?;
        tx.execute(
            "UPDATE dbs SET base_txid = ?2 WHERE name = ?1",
            params![db, txid as i64],
        )?;
        tx.execute(KEEP_EPOCH, [])?;
        tx.execute(
            "DELETE FROM txns WHERE db = ?1 AND txid <= ?2
               AND txid <= (SELECT uploaded_txid FROM dbs WHERE name = ?1)",
            params![db, txid as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The epoch this node last wrote under: of its newest transaction, or
    /// of the last lease it took writes under, even once its transactions
    /// are pruned. Transactions captured at the next mount, before any lease
    /// (recovery of a WAL tail), carry it: they were written under it, and the
    /// manifest's epoch history gives their txids to it.
    pub fn last_epoch(&self) -> Result<u64> {
        let c = self.conn.lock().unwrap();
        Ok(c.query_row(
            "SELECT max(coalesce((SELECT max(epoch) FROM txns), 0),
                        coalesce((SELECT value FROM meta WHERE key = 'epoch'), 0))",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// This node takes writes under `epoch` from now on.
    pub fn note_epoch(&self, epoch: u64) -> Result<()> {
        let c = self.conn.lock().unwrap();
        c.execute(
            "INSERT INTO meta(key, value) VALUES ('epoch', ?1)
             ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
            [epoch as i64],
        )?;
        Ok(())
    }

    /// Transactions and page bytes captured since the base image (snapshot cadence).
    pub fn since_base(&self, db: &str) -> Result<(u64, u64)> {
        let c = self.conn.lock().unwrap();
        Ok(c.query_row(
            "SELECT count(*), coalesce(sum(raw_bytes), 0) FROM txns
             WHERE db = ?1 AND txid > (SELECT base_txid FROM dbs WHERE name = ?1)",
            [db],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// Transactions (and their bytes of page data) captured and still to be
    /// uploaded: not uploaded, and not set aside as divergent.
    pub fn backlog(&self, db: &str) -> Result<(u64, u64)> {
        let c = self.conn.lock().unwrap();
        Ok(c.query_row(
            "SELECT count(*), coalesce(sum(raw_bytes), 0) FROM txns
             WHERE db = ?1 AND txid > (SELECT uploaded_txid FROM dbs WHERE name = ?1)
               AND txid > coalesce((SELECT value FROM meta WHERE key = ?2), 0)",
            params![db, aside_key(db)],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// The transactions of `db` up to `through` were set aside as divergent
    /// (the bucket's history went on without them): they are no backlog, and
    /// this history may not be continued. A new generation forgets the mark.
    pub fn mark_divergent(&self, db: &str, through: u64) -> Result<()> {
        let c = self.conn.lock().unwrap();
        c.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
            params![aside_key(db), through as i64],
        )?;
        Ok(())
    }

    /// Up to which txid `db`'s transactions were set aside, if they were.
    pub fn divergent_through(&self, db: &str) -> Result<Option<u64>> {
        let c = self.conn.lock().unwrap();
        Ok(c.query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [aside_key(db)],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map(|v| v as u64))
    }

    /// The generation just started replaced a history whose head had this
    /// checksum (see [`Journal::parent`]). Cleared by the next generation.
    pub fn set_parent(&self, db: &str, checksum: u64) -> Result<()> {
        let c = self.conn.lock().unwrap();
        c.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![parent_key(db), checksum as i64],
        )?;
        Ok(())
    }

    /// The head checksum of the history `db`'s current generation replaced,
    /// when it was started from the local file (the file and the journal
    /// disagreed): only on top of exactly that state may it continue the
    /// bucket's history.
    pub fn parent(&self, db: &str) -> Result<Option<u64>> {
        let c = self.conn.lock().unwrap();
        Ok(c.query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [parent_key(db)],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map(|v| v as u64))
    }

    pub fn clear_divergent(&self, db: &str) -> Result<()> {
        let c = self.conn.lock().unwrap();
        c.execute("DELETE FROM meta WHERE key = ?1", [aside_key(db)])?;
        Ok(())
    }

    /// (txid, epoch, commit time in ms) of the transactions after `after` up
    /// to `to`, without their pages.
    pub fn txn_times(&self, db: &str, after: u64, to: u64) -> Result<Vec<(u64, u64, i64)>> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare_cached(
            "SELECT txid, epoch, ts FROM txns
             WHERE db = ?1 AND txid > ?2 AND txid <= ?3 ORDER BY txid",
        )?;
        let rows = st.query_map(
            params![db, after as i64, to.min(i64::MAX as u64) as i64],
            |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)?,
                ))
            },
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// The `meta` key marking `db`'s divergent transactions.
fn aside_key(db: &str) -> String {
    format!("aside:{db}")
}

fn parent_key(db: &str) -> String {
    format!("parent:{db}")
}

fn row_head(r: &rusqlite::Row<'_>) -> rusqlite::Result<DbHead> {
    Ok(DbHead {
        name: r.get(0)?,
        page_size: r.get(1)?,
        generation: r.get::<_, i64>(2)? as u64,
        head_txid: r.get::<_, i64>(3)? as u64,
        head_checksum: r.get::<_, i64>(4)? as u64,
        size_pages: r.get(5)?,
        uploaded_txid: r.get::<_, i64>(6)? as u64,
        base_txid: r.get::<_, i64>(7)? as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(txid: u64, pages: &[(u32, u8)]) -> Txn {
        Txn {
            txid,
            epoch: 1,
            db_size_pages: 4,
            pre_checksum: txid,
            post_checksum: txid + 1,
            timestamp_ms: 1000 + txid as i64,
            pages: pages
                .iter()
                .map(|(p, b)| (*p, Bytes::from(vec![*b; 512])))
                .collect(),
        }
    }

    /// A first generation of `claude-mem.db`, empty.
    fn fresh_head() -> DbHead {
        DbHead {
            name: "claude-mem.db".into(),
            page_size: 512,
            generation: 1,
            head_txid: 0,
            head_checksum: 0,
            size_pages: 1,
            uploaded_txid: 0,
            base_txid: 0,
        }
    }

    #[test]
    fn append_read_upload_prune() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("journal.db")).unwrap();
        let head = fresh_head();
        j.start_generation(&head).unwrap();
        for t in 1..=5 {
            j.append("claude-mem.db", &txn(t, &[(1, t as u8), (3, 0xee)]))
                .unwrap();
        }
        let h = j.head("claude-mem.db").unwrap().unwrap();
        assert_eq!((h.head_txid, h.head_checksum), (5, 6));
        let got = j.txns("claude-mem.db", 1, u64::MAX, usize::MAX).unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], txn(2, &[(1, 2), (3, 0xee)]));
        // a byte budget still returns at least one transaction
        assert_eq!(j.txns("claude-mem.db", 0, u64::MAX, 1).unwrap().len(), 1);
        assert_eq!(j.backlog("claude-mem.db").unwrap().0, 5);
        j.mark_uploaded("claude-mem.db", 3).unwrap();
        assert_eq!(j.backlog("claude-mem.db").unwrap().0, 2);
        j.set_base("claude-mem.db", 4).unwrap();
        // only uploaded-and-in-base transactions are dropped
        let left: Vec<u64> = j
            .txns("claude-mem.db", 0, u64::MAX, usize::MAX)
            .unwrap()
            .iter()
            .map(|t| t.txid)
            .collect();
        assert_eq!(left, [4, 5]);
        // a reopened journal has the same head
        drop(j);
        let j = Journal::open(&dir.path().join("journal.db")).unwrap();
        assert_eq!(j.head("claude-mem.db").unwrap().unwrap().base_txid, 4);
    }

    #[test]
    fn divergent_transactions_are_no_backlog_until_a_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("journal.db")).unwrap();
        j.start_generation(&fresh_head()).unwrap();
        for t in 1..=4 {
            j.append("claude-mem.db", &txn(t, &[(1, t as u8)])).unwrap();
        }
        j.mark_uploaded("claude-mem.db", 1).unwrap();
        assert_eq!(j.backlog("claude-mem.db").unwrap().0, 3);
        j.mark_divergent("claude-mem.db", 3).unwrap();
        assert_eq!(j.divergent_through("claude-mem.db").unwrap(), Some(3));
        assert_eq!(j.backlog("claude-mem.db").unwrap().0, 1, "only txid 4");
        let times = j.txn_times("claude-mem.db", 1, 3).unwrap();
        assert_eq!(times, [(2, 1, 1002), (3, 1, 1003)]);
        let mut head = fresh_head();
        head.generation = 2;
        j.start_generation(&head).unwrap();
        assert_eq!(j.divergent_through("claude-mem.db").unwrap(), None);
    }

    #[test]
    fn the_last_epoch_survives_pruning_and_follows_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("journal.db")).unwrap();
        assert_eq!(j.last_epoch().unwrap(), 0);
        let mut head = fresh_head();
        j.start_generation(&head).unwrap();
        let mut t = txn(1, &[(1, 1)]);
        t.epoch = 3;
        j.append("claude-mem.db", &t).unwrap();
        j.mark_uploaded("claude-mem.db", 1).unwrap();
        j.set_base("claude-mem.db", 1).unwrap();
        assert!(j
            .txns("claude-mem.db", 0, u64::MAX, usize::MAX)
            .unwrap()
            .is_empty());
        assert_eq!(j.last_epoch().unwrap(), 3, "pruned with its transactions");
        head.generation = 2;
        head.base_txid = 5;
        j.start_generation(&head).unwrap();
        assert_eq!(j.last_epoch().unwrap(), 3, "lost with a new generation");
        j.note_epoch(5).unwrap();
        j.note_epoch(4).unwrap();
        drop(j);
        let j = Journal::open(&dir.path().join("journal.db")).unwrap();
        assert_eq!(j.last_epoch().unwrap(), 5);
    }
}
