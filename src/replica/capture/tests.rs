use super::*;
use crate::sqlite::testvfs::{Ev, Kind, RecVfs};

const DB: &str = "a.db";

/// Real SQLite writing a database whose every change is reported to a
/// real [`Capture`] the way the FUSE layer reports it (after it reached the
/// file, an error failing SQLite's call), over a real journal.
struct Fixture {
    dir: tempfile::TempDir,
    journal: Arc<Journal>,
    vfs: RecVfs,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        std::fs::create_dir_all(&backing).unwrap();
        let journal = Arc::new(Journal::open(&dir.path().join("journal.db")).unwrap());
        let capture = Arc::new(Capture::new(
            super::open_root(&backing),
            journal.clone(),
            dir.path().join("base"),
            Arc::new(AtomicU64::new(1)),
            Arc::new(tokio::sync::Notify::new()),
            Status::for_tests("n"),
        ));
        let vfs = RecVfs::register(false);
        vfs.on_change(move |ev| {
            let class = |k: &Kind| class_of(k, DB);
            let res = match ev {
                Ev::Write { kind, offset, data } => {
                    class(kind).map(|c| capture.written(&c, *offset, data.len() as u64))
                }
                Ev::Truncate { kind, size } => class(kind).map(|c| capture.truncated(&c, *size)),
                Ev::Delete { kind } => class(kind).map(|c| capture.removed(&c)),
            };
            res.is_none_or(|r| r.is_ok())
        });
        Fixture { dir, journal, vfs }
    }

    fn db_path(&self) -> PathBuf {
        self.dir.path().join("backing").join(DB)
    }

    fn head(&self) -> DbHead {
        self.journal.head(DB).unwrap().expect("captured")
    }

    /// Makes the journal refuse the append of `txid` for real: a row
    /// already holds its key, so the journal's own transaction fails and
    /// rolls back, as it would on a full disk or an I/O error.
    fn block_append(&self, txid: u64, blocked: bool) {
        let c = rusqlite::Connection::open(self.dir.path().join("journal.db")).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        if blocked {
            c.execute(
                "INSERT INTO txns VALUES (?1, ?2, 0, 0, 0, 0, 0, 1, 0, x'')",
                rusqlite::params![DB, txid as i64],
            )
            .unwrap();
        } else {
            c.execute(
                "DELETE FROM txns WHERE db = ?1 AND txid = ?2",
                rusqlite::params![DB, txid as i64],
            )
            .unwrap();
        }
    }

    /// The journal's history ends exactly at the database file's content:
    /// same checksum, and replaying it from the base gives the same bytes.
    fn assert_journal_matches_file(&self) {
        let h = self.head();
        let file = std::fs::read(self.db_path()).unwrap();
        let ps = h.page_size as usize;
        let live = &file[..h.size_pages as usize * ps];
        let hashes = PageHashes::from_bytes(live, h.page_size).unwrap();
        assert_eq!(hashes.page_count(), h.size_pages);
        assert_eq!(
            hashes.checksum(),
            h.head_checksum,
            "the journal's head checksum is not the file's"
        );
        let out = self.dir.path().join("replayed.db");
        crate::journal::base::materialize(
            &self.journal,
            &self.dir.path().join("base"),
            &h,
            h.head_txid,
            &out,
        )
        .unwrap();
        assert!(std::fs::read(&out).unwrap() == live, "replay differs");
    }
}

/// Issue 11, item 1: a failed journal append leaves capture exactly as
/// before the transaction. SQLite gets the error and its transaction
/// fails; the next ones are captured in full, chained on the real file.
fn failed_append_then_capture_goes_on(mode: &str) {
    let f = Fixture::new();
    let c = f.vfs.open(&f.db_path());
    c.execute_batch(&format!(
        "PRAGMA journal_mode={mode};
         CREATE TABLE t1(x); CREATE TABLE t2(x);
         INSERT INTO t1 VALUES (randomblob(100));
         INSERT INTO t2 VALUES (randomblob(100));"
    ))
    .unwrap();
    if mode != "wal" {
        f.assert_journal_matches_file(); // (in WAL mode the file lacks the WAL's pages)
    }
    let next = f.head().head_txid + 1;
    f.block_append(next, true);
    // Touches a page (t1's) that no later transaction touches.
    let failed = c.execute("INSERT INTO t1 VALUES (randomblob(300))", []);
    assert!(failed.is_err(), "{mode}: the commit must fail");
    assert_eq!(f.head().head_txid, next - 1, "{mode}: nothing journaled");
    f.block_append(next, false);
    for i in 0..5 {
        c.execute("INSERT INTO t2 VALUES (?1)", [i]).unwrap();
    }
    let h = f.head();
    assert!(
        h.head_txid >= next + 4,
        "{mode}: later commits captured: {h:?}"
    );
    if mode == "wal" {
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    }
    drop(c);
    f.assert_journal_matches_file();
}

#[test]
fn failed_append_leaves_wal_capture_as_before() {
    failed_append_then_capture_goes_on("wal");
}

#[test]
fn failed_append_leaves_rollback_capture_as_before() {
    failed_append_then_capture_goes_on("delete");
}
