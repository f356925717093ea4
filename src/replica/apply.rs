//! The secondary's view: verified transactions committed as real SQLite WAL
//! transactions (docs/ARCHITECTURE.md, "The view on a secondary").
//!
//! A secondary presents each replicated database as the WAL database it is, so
//! a client that runs `PRAGMA journal_mode = WAL` at connect (claude-mem's
//! worker does, and treats a refusal as fatal) works unchanged. The daemon
//! keeps one connection of its own per database, opened *through the mount*,
//! and commits each transaction from the bucket by writing its page images
//! with the `sqlite_dbpage` virtual table. The WAL, the wal-index and every
//! lock are therefore SQLite's: a reader mid-transaction keeps its snapshot,
//! a new one sees the transaction whole, and nobody waits on the daemon.
//!
//! Invariants:
//! - Every SQLite call runs on one dedicated thread, whose thread id the
//!   filesystem recognises ([`Applier::is_applier`]): it is the only writer a
//!   non-primary lets through to a database and its `-wal`.
//! - While a connection is open no other fd of this process may be opened
//!   and closed on the database through the mount (closing any fd drops every
//!   POSIX lock the process holds on the file); [`Applier::close`] first.
//! - A committing pager stamps page 1 with its own change counter and library
//!   version (bytes 24..28, 92..100). Those bytes carry no data, but they make
//!   the file differ from the primary's; the page 1 the primary wrote is kept
//!   (in memory and under the state dir) and written back into the main file
//!   after a full checkpoint, so a verified or promoted file is byte-exact.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::sqlite::header;

/// How long the applier waits for SQLite's own locks (a checkpoint waiting
/// for a reader to finish, a write lock held by a connection left from when
/// this node was primary).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// One transaction to commit: page images and the database size after it.
#[derive(Debug, Clone)]
pub struct ViewTxn {
    pub pages: Vec<(u32, Bytes)>,
    pub size_pages: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{db}: {source}")]
    Sqlite {
        db: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{db}: {source}")]
    Io {
        db: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{db}: a checkpoint could not finish: a reader kept the WAL busy")]
    CheckpointBusy { db: String },
    #[error("the view is paused while the mount is being unmounted")]
    Paused,
    #[error("the mount is gone")]
    Unmounted,
    #[error("the applier thread stopped")]
    Stopped,
}

type Reply<T> = mpsc::Sender<Result<T, ApplyError>>;

enum Job {
    Apply {
        db: String,
        txns: Vec<ViewTxn>,
        reply: Reply<()>,
    },
    /// Checkpoint everything, truncate the WAL, restore the primary's page 1.
    Settle {
        db: String,
        open: bool,
        reply: Reply<bool>,
    },
    Close {
        db: Option<String>,
        pause: Option<Duration>,
        reply: Reply<()>,
    },
    /// The file was laid out directly from the bucket: page 1 is exact.
    Forget { db: String },
}

pub struct Applier {
    jobs: Mutex<mpsc::Sender<Job>>,
    tid: Arc<AtomicI32>,
}

struct Worker {
    mount_dir: PathBuf,
    /// The mount's device: a view is never opened on what lies under it
    /// once it is gone (unmounted, or detached while files were open).
    mount_dev: u64,
    backing: PathBuf,
    hints: PathBuf,
    conns: HashMap<String, Connection>,
    /// Databases with transactions applied since their last settle.
    dirty: std::collections::HashSet<String>,
    /// The primary's page 1 as last applied, when it differs from what the
    /// local pager stamped.
    page1: HashMap<String, Bytes>,
    paused_until: Option<Instant>,
}

impl Applier {
    /// `mount_dir` is where connections are opened (through the mount),
    /// `backing` the directory underneath, `state_dir` where page-1 hints live.
    pub fn start(mount_dir: &Path, backing: &Path, state_dir: &Path) -> std::io::Result<Applier> {
        let (tx, rx) = mpsc::channel();
        let tid = Arc::new(AtomicI32::new(0));
        let hints = state_dir.join("view");
        let mount_dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(mount_dir)?);
        let mut w = Worker {
            mount_dir: mount_dir.to_path_buf(),
            mount_dev,
            backing: backing.to_path_buf(),
            page1: load_hints(&hints),
            hints,
            conns: HashMap::new(),
            dirty: Default::default(),
            paused_until: None,
        };
        let t = tid.clone();
        std::thread::Builder::new()
            .name("view-applier".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions and cannot fail.
                t.store(unsafe { libc::gettid() }, Ordering::Release);
                while let Ok(job) = rx.recv() {
                    w.run(job);
                }
                w.conns.clear();
            })?;
        Ok(Applier {
            jobs: Mutex::new(tx),
            tid,
        })
    }

    /// Whether a FUSE request comes from the applier's thread.
    pub fn is_applier(&self, pid: u32) -> bool {
        let t = self.tid.load(Ordering::Acquire);
        t != 0 && t as u32 == pid
    }

    fn call<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, ApplyError> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .lock()
            .unwrap()
            .send(job(tx))
            .map_err(|_| ApplyError::Stopped)?;
        rx.recv().map_err(|_| ApplyError::Stopped)?
    }

    /// Commits `txns` in order, one SQLite transaction each. Blocking.
    pub fn apply(&self, db: &str, txns: Vec<ViewTxn>) -> Result<(), ApplyError> {
        self.call(|reply| Job::Apply {
            db: db.to_string(),
            txns,
            reply,
        })
    }

    /// Brings every committed frame into the main file, empties the WAL and
    /// writes back the primary's page 1: the backing file is then exactly the
    /// state the view shows. `false` when the view of `db` was not in use
    /// (no connection, nothing applied since the last settle): nothing done.
    /// Blocking.
    pub fn settle(&self, db: &str) -> Result<bool, ApplyError> {
        self.call(|reply| Job::Settle {
            db: db.to_string(),
            open: false,
            reply,
        })
    }

    /// [`Applier::settle`], opening the view first if it is not open: the
    /// backing file becomes the whole state, whatever WAL was left (the
    /// follower's first look at a database after a start or a demotion).
    pub fn settle_open(&self, db: &str) -> Result<bool, ApplyError> {
        self.call(|reply| Job::Settle {
            db: db.to_string(),
            open: true,
            reply,
        })
    }

    /// Closes the connection to `db` (all when `None`). Blocking.
    pub fn close(&self, db: Option<&str>) -> Result<(), ApplyError> {
        self.call(|reply| Job::Close {
            db: db.map(str::to_string),
            pause: None,
            reply,
        })
    }

    /// Closes every connection and opens none for `d`: the mount can be
    /// unmounted meanwhile (the daemon's own open files would keep it busy).
    pub fn pause(&self, d: Duration) -> Result<(), ApplyError> {
        self.call(|reply| Job::Close {
            db: None,
            pause: Some(d),
            reply,
        })
    }

    /// The file of `db` was written whole from the bucket: its page 1 is
    /// the primary's, nothing to restore.
    pub fn forget_page1(&self, db: &str) {
        let _ = self
            .jobs
            .lock()
            .unwrap()
            .send(Job::Forget { db: db.into() });
    }
}

impl Worker {
    fn run(&mut self, job: Job) {
        match job {
            Job::Apply { db, txns, reply } => {
                let _ = reply.send(self.apply(&db, &txns));
            }
            Job::Settle { db, open, reply } => {
                let _ = reply.send(self.settle(&db, open));
            }
            Job::Close { db, pause, reply } => {
                match db {
                    Some(db) => {
                        self.conns.remove(&db);
                    }
                    None => self.conns.clear(),
                }
                if let Some(p) = pause {
                    self.paused_until = Some(Instant::now() + p);
                }
                let _ = reply.send(Ok(()));
            }
            Job::Forget { db } => {
                self.page1.remove(&db);
                let _ = std::fs::remove_file(hint_path(&self.hints, &db));
            }
        }
    }

    fn conn(&mut self, db: &str) -> Result<&mut Connection, ApplyError> {
        if self.paused_until.is_some_and(|t| Instant::now() < t) {
            return Err(ApplyError::Paused);
        }
        self.paused_until = None;
        if !self.conns.contains_key(db) {
            let dev =
                std::fs::metadata(&self.mount_dir).map(|m| std::os::unix::fs::MetadataExt::dev(&m));
            if dev.ok() != Some(self.mount_dev) {
                return Err(ApplyError::Unmounted);
            }
            let sql = |source| ApplyError::Sqlite {
                db: db.to_string(),
                source,
            };
            let c = Connection::open_with_flags(
                self.mount_dir.join(db),
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(sql)?;
            c.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
            // The local copy can always be rebuilt from the bucket: no fsync
            // per applied transaction, only at checkpoints.
            c.pragma_update(None, "synchronous", "NORMAL")
                .map_err(sql)?;
            // Reads page 1: the connection takes the database's own mode
            // (WAL for claude-mem) and opens, or creates, its -wal now, so
            // clients never need to create it themselves.
            let _: String = c
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .map_err(sql)?;
            self.conns.insert(db.to_string(), c);
        }
        Ok(self.conns.get_mut(db).expect("inserted above"))
    }

    fn apply(&mut self, db: &str, txns: &[ViewTxn]) -> Result<(), ApplyError> {
        let sql = |source| ApplyError::Sqlite {
            db: db.to_string(),
            source,
        };
        let mut last_page1 = None;
        self.dirty.insert(db.to_string());
        let c = self.conn(db)?;
        for t in txns {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            {
                // The btree's own count: sqlite_dbpage writes do not move it.
                let before: u32 = tx
                    .query_row("PRAGMA page_count", [], |r| r.get(0))
                    .map_err(sql)?;
                let mut put = tx
                    .prepare_cached("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)")
                    .map_err(sql)?;
                let mut count = before;
                for (pgno, page) in t.pages.iter().filter(|(n, _)| *n <= t.size_pages) {
                    put.execute(rusqlite::params![pgno, &page[..]])
                        .map_err(sql)?;
                    count = count.max(*pgno);
                }
                if t.size_pages > count {
                    // Pages the primary never wrote read as zeros there too.
                    let page_size: u32 = tx
                        .query_row("PRAGMA page_size", [], |r| r.get(0))
                        .map_err(sql)?;
                    let zero = vec![0u8; page_size as usize];
                    let lock_page = header::lock_byte_page(page_size);
                    for pgno in (count + 1..=t.size_pages).filter(|p| *p != lock_page) {
                        put.execute(rusqlite::params![pgno, &zero[..]])
                            .map_err(sql)?;
                    }
                }
                if t.size_pages < count {
                    // Must come last: any later page write cancels it.
                    tx.execute(
                        "INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, NULL)",
                        [t.size_pages + 1],
                    )
                    .map_err(sql)?;
                }
            }
            tx.commit().map_err(sql)?;
            if let Some((_, p)) = t.pages.iter().find(|(n, _)| *n == 1) {
                last_page1 = Some(p.clone());
            }
        }
        if let Some(p) = last_page1 {
            self.page1.insert(db.to_string(), p.clone());
            save_hint(&self.hints, db, &p);
        }
        Ok(())
    }

    fn settle(&mut self, db: &str, open: bool) -> Result<bool, ApplyError> {
        if !open && !self.conns.contains_key(db) && !self.dirty.contains(db) {
            return Ok(false);
        }
        let sql = |source| ApplyError::Sqlite {
            db: db.to_string(),
            source,
        };
        let c = self.conn(db)?;
        let (busy, _log, _done): (i64, i64, i64) = c
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(sql)?;
        if busy != 0 {
            return Err(ApplyError::CheckpointBusy { db: db.into() });
        }
        self.dirty.remove(db);
        let Some(want) = self.page1.get(db).cloned() else {
            return Ok(true);
        };
        let io = |source| ApplyError::Io {
            db: db.to_string(),
            source,
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.backing.join(db))
            .map_err(io)?;
        let mut have = vec![0u8; want.len()];
        f.read_exact_at(&mut have, 0).map_err(io)?;
        if have[..] != want[..] && header::same_but_stamps(&have, &want) {
            // Only bytes no reader in WAL mode looks at: safe under readers.
            f.write_all_at(&want, 0).map_err(io)?;
        }
        Ok(true)
    }
}

fn hint_path(dir: &Path, db: &str) -> PathBuf {
    dir.join(format!("{}.page1", db.replace('/', "%2F")))
}

/// A hint only: lost or stale, the follower verifies and rebuilds instead.
fn save_hint(dir: &Path, db: &str, page: &[u8]) {
    let path = hint_path(dir, db);
    let tmp = path.with_extension("tmp");
    let res = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, page))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = res {
        tracing::debug!(db, error = %e, "could not keep the view's page-1 hint");
    }
}

fn load_hints(dir: &Path) -> HashMap<String, Bytes> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return HashMap::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(".page1")?.to_string();
            let bytes = std::fs::read(e.path()).ok()?;
            Some((name.replace("%2F", "/"), Bytes::from(bytes)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The logical pages of a database written by the `sqlite3` CLI (another
    /// SQLite than the bundled one), read after a full checkpoint.
    fn image(path: &Path) -> Vec<u8> {
        let out = std::process::Command::new("sqlite3")
            .arg(path)
            .arg("PRAGMA wal_checkpoint(TRUNCATE);")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        std::fs::read(path).unwrap()
    }

    fn cli(path: &Path, sql: &str) {
        let out = std::process::Command::new("sqlite3")
            .arg(path)
            .arg(sql)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    /// Each transaction of another SQLite's primary, applied through the
    /// view and settled, leaves a file byte for byte the primary's: the page-1
    /// stamps of the local pager are written back.
    #[test]
    fn applied_transactions_settle_to_the_primarys_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (primary, view, state) = (
            dir.path().join("p"),
            dir.path().join("v"),
            dir.path().join("s"),
        );
        std::fs::create_dir_all(&primary).unwrap();
        std::fs::create_dir_all(&view).unwrap();
        let pdb = primary.join("x.db");
        cli(
            &pdb,
            "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);",
        );
        let mut before = image(&pdb);
        std::fs::write(view.join("x.db"), &before).unwrap();
        let a = Applier::start(&view, &view, &state).unwrap();
        let ps = 4096;
        for i in 0..30 {
            let sql = match i % 5 {
                0 => format!(
                    "CREATE TABLE u{i}(x); INSERT INTO t(v) VALUES (hex(randomblob(3000)));"
                ),
                1 => "DELETE FROM t WHERE id % 3 = 0;".to_string(),
                2 => "DROP TABLE IF EXISTS u0; VACUUM;".to_string(),
                _ => format!("INSERT INTO t(v) VALUES ('{i}');"),
            };
            cli(&pdb, &sql);
            let after = image(&pdb);
            let pages = after
                .chunks(ps)
                .enumerate()
                .filter(|(n, p)| before.get(n * ps..(n + 1) * ps) != Some(*p))
                .map(|(n, p)| (n as u32 + 1, Bytes::copy_from_slice(p)))
                .collect();
            a.apply(
                "x.db",
                vec![ViewTxn {
                    pages,
                    size_pages: (after.len() / ps) as u32,
                }],
            )
            .unwrap();
            assert!(a.settle("x.db").unwrap());
            let got = std::fs::read(view.join("x.db")).unwrap();
            assert_eq!(got.len(), after.len(), "size after step {i}");
            for (n, (x, y)) in got.chunks(ps).zip(after.chunks(ps)).enumerate() {
                let diff: Vec<usize> = (0..ps).filter(|k| x[*k] != y[*k]).collect();
                assert!(
                    x == y,
                    "page {} differs after step {i} ({sql}) at {} bytes, first {:?}, view {:?} primary {:?}",
                    n + 1,
                    diff.len(),
                    &diff[..diff.len().min(8)],
                    &x[diff[0]..(diff[0] + 8).min(ps)],
                    &y[diff[0]..(diff[0] + 8).min(ps)]
                );
            }
            before = after;
        }
    }
}
