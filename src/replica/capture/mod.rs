//! Capture on the primary: the filesystem's write reports become committed
//! transactions in the local journal, before the committing write returns.
//!
//! WAL mode: every write to `-wal` is noted; when one may complete a commit
//! frame the tracker scans the new frames from the backing file. Rollback modes:
//! database writes made while the journal is hot are collected, and captured
//! when the journal goes cold (unlinked, truncated, or its header zeroed).
//! Checkpoint writes into the main file are passed through and not captured:
//! their content was captured from the frames. Each transaction gets the next
//! txid and the whole-database checksum before and after it.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::fs::class::{PathClass, Sidecar};
use crate::fs::Replication;
use crate::journal::base::base_path;
use crate::journal::{DbHead, Journal, Txn};
use crate::sqlite::checksum::PageHashes;
use crate::sqlite::header::DbHeader;
use crate::sqlite::rollback::{self, CommitDetector, JournalEvent, Transition};
use crate::sqlite::wal::{WalTracker, WalTxn};
use crate::status::Status;

mod recover;

/// When a commit is acknowledged (docs/ARCHITECTURE.md, "Durability"):
/// `local` only, for now (`bucket` is designed there, not built).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once on this disk; shipped within about a second. Databases in WAL
    /// mode are served by the kernel and their commits tailed.
    Local,
}

impl Durability {
    pub fn name(self) -> &'static str {
        match self {
            Durability::Local => "local",
        }
    }
}

/// Where captured state lives: the journal, base images, the uploader's wake-up.
pub struct Capture {
    root: OwnedFd,
    journal: Arc<Journal>,
    base_dir: PathBuf,
    epoch: Arc<AtomicU64>,
    wake: Arc<tokio::sync::Notify>,
    status: Status,
    dbs: Mutex<HashMap<String, Arc<Mutex<DbCapture>>>>,
    /// Replicated files: recorded whole at each change, published by the uploader.
    files: super::files::Recorder,
    /// When the last transaction was captured (ms since the epoch, 0: none
    /// in this run): whether a primary is idle (policy `follow`).
    last_commit_ms: AtomicI64,
    /// Databases served by the kernel, their commits tailed from the WAL.
    tails: Arc<super::tail::Tails>,
}

/// One replicated database's capture state; its mutex serializes its writes.
struct DbCapture {
    name: String,
    head: DbHead,
    hashes: PageHashes,
    tracker: WalTracker,
    wal: Option<File>,
    detector: CommitDetector,
    /// Byte ranges of the main file written since the journal became hot, or
    /// written with no journal at all (journal_mode=OFF/MEMORY).
    dirty: Vec<(u64, u64)>,
    unjournaled: bool,
}

/// Why a write could not be captured. The write itself reached the disk; the
/// caller gets an error so SQLite does not report a commit that is not journaled.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{db}: {source}")]
    Io { db: String, source: std::io::Error },
    #[error(transparent)]
    Journal(#[from] crate::journal::store::JournalError),
    #[error("{db}: {why}")]
    Inconsistent { db: String, why: String },
}

impl CaptureError {
    fn errno(&self) -> i32 {
        match self {
            CaptureError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

type Result<T> = std::result::Result<T, CaptureError>;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Capture {
    pub fn new(
        root: OwnedFd,
        journal: Arc<Journal>,
        base_dir: PathBuf,
        epoch: Arc<AtomicU64>,
        wake: Arc<tokio::sync::Notify>,
        status: Status,
    ) -> Capture {
        Capture {
            root,
            journal,
            base_dir,
            epoch,
            wake,
            status,
            dbs: Mutex::new(HashMap::new()),
            files: super::files::Recorder::default(),
            last_commit_ms: AtomicI64::new(0),
            tails: Arc::default(),
        }
    }

    /// Passthrough of databases and the tailer's state.
    pub fn tails(&self) -> &Arc<super::tail::Tails> {
        &self.tails
    }

    /// On the primary, captures every commit the kernel served that the
    /// tailer has not read yet: whoever looks at the journal next (status,
    /// `push`) sees every commit acknowledged before it looked.
    pub fn catch_up(&self) {
        if !self.tails.writers_allowed() {
            return;
        }
        let dbs: Vec<String> = self.dbs.lock().unwrap().keys().cloned().collect();
        for db in dbs {
            if self.tails.io(&db) == super::tail::Io::Armed {
                if let Err(e) = self.tail(&db) {
                    tracing::error!(db, error = %e, "capturing from the WAL failed");
                }
            }
        }
    }

    /// Captures what was committed to `db`'s `-wal` since the last look,
    /// with nobody reporting the writes (they were served by the kernel).
    /// True when caught up. A WAL that started over twice since the last
    /// look lost frames nobody read (the pin was not held): the database
    /// is then reconciled as at mount, writers held off.
    pub fn tail(&self, db: &str) -> Result<bool> {
        let known = self.dbs.lock().unwrap().get(db).cloned();
        let d = match known {
            Some(d) => d,
            // Forgotten since it was armed (a fencing sets the journal's
            // tail aside and starts over from the files): reconcile it as at
            // mount, writers held off, as the write path would at its next
            // write.
            None => {
                self.tails.frozen(db, || self.recover(db))?;
                match self.dbs.lock().unwrap().get(db).cloned() {
                    Some(d) => d,
                    None => return Ok(true), // no database file (yet)
                }
            }
        };
        let missed = {
            let mut st = d.lock().unwrap();
            let io = Self::io(db);
            if st.wal.is_none() {
                st.wal = self.open(&format!("{db}-wal")).map_err(&io)?;
            }
            let Some(wal) = st.wal.take() else {
                return Ok(true);
            };
            let mut raw = [0u8; crate::sqlite::wal::WAL_HEADER_LEN];
            let n = wal.read_at(&mut raw, 0).unwrap_or(0);
            let seq = crate::sqlite::wal::WalHeader::parse(&raw[..n])
                .ok()
                .map(|h| h.checkpoint_seq);
            let known = st.tracker.header().map(|h| h.checkpoint_seq);
            let missed =
                matches!((known, seq), (Some(k), Some(s)) if s > k.wrapping_add(1) && s > k);
            let res = if missed {
                Ok(())
            } else {
                st.tracker.rewind_pending();
                self.capture_wal_batch(&mut st, &wal)
            };
            st.wal = Some(wal);
            res?;
            missed
        };
        if missed {
            tracing::warn!(db, "the WAL started over twice between two looks: reconciling the database with the journal");
            self.tails.frozen(db, || self.recover(db))?;
        }
        Ok(true)
    }
    pub fn files(&self) -> &super::files::Recorder {
        &self.files
    }

    /// `/proc/self/fd/<dir fd>`: the directory under the mount.
    pub fn backing_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.root.as_raw_fd()))
    }

    /// A replicated file changed (closed after a write, fsynced, renamed onto
    /// or unlinked): record the version it now holds for the uploader.
    fn file_changed(&self, name: &str) {
        if self.files.record(&self.backing_dir(), name) {
            self.wake.notify_one();
        }
    }

    /// When the last transaction was captured in this run, if any.
    pub fn last_commit(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        match self.last_commit_ms.load(Ordering::Acquire) {
            0 => None,
            ms => chrono::DateTime::from_timestamp_millis(ms),
        }
    }

    fn backing(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{rel}", self.root.as_raw_fd()))
    }

    fn open(&self, rel: &str) -> std::io::Result<Option<File>> {
        match File::open(self.backing(rel)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn io(db: &str) -> impl Fn(std::io::Error) -> CaptureError + '_ {
        move |source| CaptureError::Io {
            db: db.to_string(),
            source,
        }
    }

    /// The view applier wrote `db`'s `-wal` while this node was not primary
    /// (and emptied it before promotion): what capture knew of it is void.
    pub fn forget_wal(&self, db: &str) {
        let st = self.dbs.lock().unwrap().get(db).cloned();
        if let Some(st) = st {
            let mut st = st.lock().unwrap();
            st.tracker.reset_to_start();
            st.wal = None;
        }
    }

    /// The replicated databases this node knows (journaled or being captured).
    pub fn db_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .journal
            .heads()
            .map(|hs| hs.into_iter().map(|h| h.name).collect())
            .unwrap_or_default();
        names.extend(self.dbs.lock().unwrap().keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    /// Transactions journaled and still to be published (not set aside as
    /// divergent), over every database.
    pub fn unpublished(&self) -> u64 {
        self.journal
            .heads()
            .unwrap_or_default()
            .iter()
            .map(|h| self.journal.backlog(&h.name).map_or(0, |b| b.0))
            .sum()
    }

    fn db(&self, name: &str) -> Result<Arc<Mutex<DbCapture>>> {
        if let Some(d) = self.dbs.lock().unwrap().get(name) {
            return Ok(d.clone());
        }
        // First sight of a database created after the mount (or whose file
        // appeared): reconcile it exactly as at mount. Its writer holds SQLite's
        // locks, so it is quiescent but for this very write.
        self.recover(name)?;
        let mut dbs = self.dbs.lock().unwrap();
        Ok(dbs
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Mutex::new(DbCapture {
                    name: name.to_string(),
                    head: empty_head(name, 0),
                    hashes: PageHashes::new(512).expect("512 is a page size"),
                    tracker: WalTracker::new(),
                    wal: None,
                    detector: CommitDetector::new(false),
                    dirty: Vec::new(),
                    unjournaled: false,
                }))
            })
            .clone())
    }

    /// Record one committed transaction: journal first, then the in-memory
    /// head and page hashes. All or nothing: on an error they are exactly as
    /// the journal has them, so the next transaction chains on what is
    /// journaled (a transaction SQLite was told failed is never half-counted).
    fn commit(&self, st: &mut DbCapture, pages: Vec<(u32, Bytes)>, size: u32) -> Result<()> {
        if st.head.page_size == 0 {
            // A database created under the mount: its history starts empty.
            let Some(ps) = pages.first().map(|(_, p)| p.len() as u32) else {
                return Ok(());
            };
            let hashes = PageHashes::new(ps).map_err(|e| inconsistent(&st.name, e))?;
            let head = DbHead {
                generation: 1,
                ..empty_head(&st.name, ps)
            };
            let io = Self::io(&st.name);
            std::fs::create_dir_all(&self.base_dir).map_err(&io)?;
            File::create(base_path(&self.base_dir, &st.name, 0)).map_err(&io)?;
            self.journal.start_generation(&head)?;
            st.hashes = hashes;
            st.head = head;
        }
        let pre = st.hashes.checksum();
        let post = st
            .hashes
            .checksum_after(pages.iter().map(|(n, p)| (*n, p.as_ref())), size)
            .map_err(|e| inconsistent(&st.name, e))?;
        if post == pre && size == st.hashes.page_count() {
            return Ok(()); // a rolled-back spill or a rewrite of identical bytes
        }
        let txn = Txn {
            txid: st.head.head_txid + 1,
            epoch: self.epoch.load(Ordering::Relaxed),
            db_size_pages: size,
            pre_checksum: pre,
            post_checksum: post,
            timestamp_ms: now_ms(),
            pages,
        };
        self.journal.append(&st.name, &txn)?;
        self.last_commit_ms
            .store(txn.timestamp_ms, Ordering::Release);
        self.status.metrics().txns_captured(&st.name, 1);
        st.hashes
            .apply(txn.pages.iter().map(|(n, p)| (*n, p.as_ref())), size)
            .map_err(|e| inconsistent(&st.name, e))?;
        st.head.head_txid = txn.txid;
        st.head.head_checksum = post;
        st.head.size_pages = size;
        self.publish(&st.name, st);
        self.wake.notify_one();
        Ok(())
    }

    fn publish(&self, db: &str, st: &DbCapture) {
        let head = st.head.head_txid;
        // What the journal knew published when capture started (status
        // starts at 0, and only a primary's uploader refreshes it).
        self.status.committed(db, head, st.head.uploaded_txid);
    }

    fn wal_written(&self, st: &mut DbCapture, offset: u64, len: u64) -> Result<()> {
        if !st.tracker.note_write(offset, len) {
            return Ok(());
        }
        let db = st.name.clone();
        if st.wal.is_none() {
            st.wal = self.open(&format!("{db}-wal")).map_err(Self::io(&db))?;
        }
        let Some(wal) = st.wal.take() else {
            return Ok(());
        };
        let res = self.capture_wal(st, &wal);
        st.wal = Some(wal);
        res
    }

    /// One transaction at a time: one that cannot be journaled is taken back,
    /// so the tracker's position and checksum chain stay where the journal
    /// is. SQLite gets the error and writes its next transaction over the
    /// same frames, and that is what the next scan reads.
    fn capture_wal(&self, st: &mut DbCapture, wal: &File) -> Result<()> {
        while let Some(t) = st.tracker.scan_next(wal).map_err(Self::io(&st.name))? {
            if let Err(e) = self.commit(st, wal_pages(&t), t.db_size_pages) {
                st.tracker.undo_last();
                return Err(e);
            }
        }
        Ok(())
    }

    /// The tailer's capture: every transaction committed since the last
    /// look, journaled in one go. All or nothing as well: on an error the
    /// tracker, hashes and head stay where the journal is, and the next look
    /// reads the same frames again (nobody is waiting on this answer).
    fn capture_wal_batch(&self, st: &mut DbCapture, wal: &File) -> Result<()> {
        if st.head.page_size == 0 {
            // Its first transaction starts its history: one at a time.
            return self.capture_wal(st, wal);
        }
        let saved = st.tracker.clone();
        let found = st.tracker.scan(wal).map_err(Self::io(&st.name))?;
        if found.is_empty() {
            return Ok(());
        }
        let res = (|| {
            let mut hashes = st.hashes.clone();
            let mut txid = st.head.head_txid;
            let epoch = self.epoch.load(Ordering::Relaxed);
            let mut txns = Vec::with_capacity(found.len());
            for t in &found {
                let (pre, pages) = (hashes.checksum(), hashes.page_count());
                apply_wal(&mut hashes, t).map_err(|e| inconsistent(&st.name, e))?;
                let post = hashes.checksum();
                if post == pre && t.db_size_pages == pages {
                    continue; // a rolled-back spill or a rewrite of identical bytes
                }
                txid += 1;
                txns.push(Txn {
                    txid,
                    epoch,
                    db_size_pages: t.db_size_pages,
                    pre_checksum: pre,
                    post_checksum: post,
                    timestamp_ms: now_ms(),
                    pages: wal_pages(t),
                });
            }
            self.journal.append_all(&st.name, &txns)?;
            Ok((hashes, txns))
        })();
        let (hashes, txns) = match res {
            Ok(r) => r,
            Err(e) => {
                st.tracker = saved;
                return Err(e);
            }
        };
        let Some(last) = txns.last() else {
            return Ok(());
        };
        st.hashes = hashes;
        st.head.head_txid = last.txid;
        st.head.head_checksum = last.post_checksum;
        st.head.size_pages = last.db_size_pages;
        self.last_commit_ms
            .store(last.timestamp_ms, Ordering::Release);
        self.status
            .metrics()
            .txns_captured(&st.name, txns.len() as u64);
        self.publish(&st.name, st);
        self.wake.notify_one();
        Ok(())
    }

    fn main_written(&self, st: &mut DbCapture, offset: u64, len: u64) -> Result<()> {
        if st.detector.is_hot() {
            st.dirty.push((offset, len));
            return Ok(());
        }
        // No hot journal: a checkpoint (WAL mode), or a database without a
        // journal on disk (journal_mode=OFF/MEMORY).
        let mut b = [0u8; 20];
        let n = self
            .open(&st.name)
            .map_err(Self::io(&st.name))?
            .map(|f| f.read_at(&mut b, 0).unwrap_or(0))
            .unwrap_or(0);
        let wal_mode = n >= 20 && b[18] == 2;
        if !wal_mode {
            st.dirty.push((offset, len));
            st.unjournaled = true;
        }
        Ok(())
    }

    /// Capture the database pages written since the journal went hot. All or
    /// nothing: if the transaction cannot be journaled, the written ranges
    /// stay pending and are captured with the next commit (SQLite was told
    /// the commit failed, but its pages may be in the file already: a
    /// rollback journal is gone once it is deleted).
    fn capture_main(&self, st: &mut DbCapture) -> Result<()> {
        let unjournaled = st.unjournaled;
        let ranges = std::mem::take(&mut st.dirty);
        st.unjournaled = false;
        let res = self.capture_ranges(st, &ranges);
        if res.is_err() {
            let newer = std::mem::replace(&mut st.dirty, ranges);
            st.dirty.extend(newer);
            st.unjournaled |= unjournaled;
        }
        res
    }

    fn capture_ranges(&self, st: &mut DbCapture, ranges: &[(u64, u64)]) -> Result<()> {
        let db = st.name.clone();
        let io = Self::io(&db);
        let Some(main) = self.open(&db).map_err(&io)? else {
            return Ok(());
        };
        let mut p1 = [0u8; 100];
        let n = main.read_at(&mut p1, 0).map_err(&io)?;
        let Ok(header) = DbHeader::parse(&p1[..n]) else {
            if ranges.is_empty() {
                return Ok(());
            }
            return Err(inconsistent(&db, "written without a valid SQLite header"));
        };
        let ps = header.page_size as u64;
        let size = rollback::committed_db_size(&p1[..n])
            .unwrap_or_else(|| (main.metadata().map(|m| m.len()).unwrap_or(0) / ps) as u32);
        let mut pgnos: Vec<u32> = ranges
            .iter()
            .filter(|(_, l)| *l > 0)
            .flat_map(|(o, l)| (o / ps + 1)..=((o + l - 1) / ps + 1))
            .map(|p| p as u32)
            .filter(|p| *p <= size)
            .collect();
        pgnos.sort_unstable();
        pgnos.dedup();
        if st.head.page_size != 0 && st.head.page_size as u64 != ps {
            // A VACUUM changed the page size: history in the old page size
            // cannot continue; start a new generation from the file as it is.
            let old = st.head.clone();
            let mut hashes = PageHashes::from_reader(&main, ps as u32).map_err(&io)?;
            hashes
                .apply(std::iter::empty(), size)
                .map_err(|e| inconsistent(&db, e))?;
            let old_hashes = std::mem::replace(&mut st.hashes, hashes);
            let res = self.new_generation(st, &main, &[], Some(&old));
            if res.is_err() {
                st.hashes = old_hashes;
            }
            return res;
        }
        let mut pages = Vec::with_capacity(pgnos.len());
        for pgno in pgnos {
            let mut buf = vec![0u8; ps as usize];
            main.read_at(&mut buf, (pgno as u64 - 1) * ps)
                .map_err(&io)?;
            pages.push((pgno, Bytes::from(buf)));
        }
        if pages.is_empty() && size == st.hashes.page_count() {
            return Ok(());
        }
        self.commit(st, pages, size)
    }

    fn journal_event(&self, st: &mut DbCapture, ev: JournalEvent<'_>) -> Result<()> {
        if st.detector.observe(ev) == Transition::Committed {
            self.capture_main(st)?;
        }
        Ok(())
    }

    fn journal_written(&self, st: &mut DbCapture, offset: u64, len: u64) -> Result<()> {
        if !rollback::write_touches_magic(offset, len) {
            return Ok(());
        }
        let db = st.name.clone();
        let mut first = [0u8; 28];
        let n = match self.open(&format!("{db}-journal")).map_err(Self::io(&db))? {
            Some(f) => f.read_at(&mut first, 0).map_err(Self::io(&db))?,
            None => 0,
        };
        self.journal_event(
            st,
            JournalEvent::HeaderWritten {
                first_bytes: &first[..n],
            },
        )
    }

    fn route(
        &self,
        class: &PathClass,
        f: impl FnOnce(&Self, &mut DbCapture, Option<Sidecar>) -> Result<()>,
    ) -> std::result::Result<(), i32> {
        let (db, side) = match class {
            PathClass::Database(db) => (db, None),
            PathClass::Sidecar(db, s) => (db, Some(*s)),
            _ => return Ok(()),
        };
        let res = self.db(db).and_then(|d| {
            let mut st = d.lock().unwrap();
            f(self, &mut st, side)
        });
        res.map_err(|e| {
            tracing::error!(error = %e, "capture failed; the write is reported as failed");
            self.status.update(|s| s.last_error = Some(e.to_string()));
            e.errno()
        })
    }
}

impl super::tail::Tailed for Capture {
    fn databases(&self) -> Vec<String> {
        self.dbs.lock().unwrap().keys().cloned().collect()
    }

    fn wal_mode(&self, db: &str) -> bool {
        let mut b = [0u8; 20];
        matches!(self.open(db), Ok(Some(f)) if f.read_at(&mut b, 0).is_ok_and(|n| n == 20))
            && b[18] == 2
            && b[19] == 2
    }

    fn tail(&self, db: &str) -> bool {
        match Capture::tail(self, db) {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(db, error = %e, "capturing from the WAL failed; retrying");
                self.status.update(|s| s.last_error = Some(e.to_string()));
                false
            }
        }
    }

    fn wal_len(&self, db: &str) -> u64 {
        std::fs::metadata(self.backing(&format!("{db}-wal"))).map_or(0, |m| m.len())
    }

    fn since_last_commit(&self) -> Option<std::time::Duration> {
        match self.last_commit_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(std::time::Duration::from_millis(
                now_ms().saturating_sub(ms) as u64,
            )),
        }
    }
}

impl Replication for Capture {
    fn written(&self, class: &PathClass, offset: u64, len: u64) -> std::result::Result<(), i32> {
        self.route(class, |c, st, side| match side {
            Some(Sidecar::Wal) => c.wal_written(st, offset, len),
            Some(Sidecar::Journal) => c.journal_written(st, offset, len),
            Some(Sidecar::Shm) => Ok(()),
            None => c.main_written(st, offset, len),
        })
    }

    fn truncated(&self, class: &PathClass, len: u64) -> std::result::Result<(), i32> {
        self.route(class, |c, st, side| match side {
            Some(Sidecar::Wal) => {
                st.tracker.note_truncate(len);
                Ok(())
            }
            Some(Sidecar::Journal) => c.journal_event(st, JournalEvent::Truncated { len }),
            // Main-file truncation follows a commit (rollback) or a checkpoint
            // (WAL); the size is taken from the header at capture time.
            _ => Ok(()),
        })
    }

    fn removed(&self, class: &PathClass) -> std::result::Result<(), i32> {
        if let PathClass::File(name) = class {
            self.file_changed(name);
            return Ok(());
        }
        self.route(class, |c, st, side| match side {
            Some(Sidecar::Wal) => {
                st.tracker.reset_to_start();
                st.wal = None;
                Ok(())
            }
            Some(Sidecar::Journal) => c.journal_event(st, JournalEvent::Unlinked),
            _ => Ok(()),
        })
    }

    fn replaced(&self, class: &PathClass) -> std::result::Result<(), i32> {
        if let PathClass::File(name) = class {
            self.file_changed(name);
            return Ok(());
        }
        self.route(class, |c, st, side| match side {
            // Another file became the database: capture every page that differs.
            None => {
                let len = std::fs::metadata(c.backing(&st.name)).map(|m| m.len());
                st.dirty.push((0, len.map_err(Self::io(&st.name))?));
                c.capture_main(st)
            }
            Some(Sidecar::Wal) => {
                st.tracker.reset_to_start();
                st.wal = None;
                c.wal_written(st, 0, u32::MAX as u64)
            }
            _ => Ok(()),
        })
    }

    fn synced(&self, class: &PathClass) -> std::result::Result<(), i32> {
        if let PathClass::File(name) = class {
            self.file_changed(name);
            return Ok(());
        }
        self.route(class, |c, st, side| {
            if side.is_none() && st.unjournaled && !st.detector.is_hot() {
                c.capture_main(st)
            } else {
                Ok(())
            }
        })
    }
}

fn empty_head(db: &str, page_size: u32) -> DbHead {
    DbHead {
        name: db.to_string(),
        page_size,
        generation: 0,
        head_txid: 0,
        head_checksum: 0,
        size_pages: 0,
        uploaded_txid: 0,
        base_txid: 0,
    }
}

fn wal_pages(t: &WalTxn) -> Vec<(u32, Bytes)> {
    t.pages.iter().map(|(n, p)| (*n, p.clone())).collect()
}

fn apply_wal(
    h: &mut PageHashes,
    t: &WalTxn,
) -> std::result::Result<u64, crate::sqlite::checksum::ChecksumError> {
    h.apply(
        t.pages.iter().map(|(n, p)| (*n, p.as_ref())),
        t.db_size_pages,
    )
}

fn inconsistent(db: &str, why: impl std::fmt::Display) -> CaptureError {
    CaptureError::Inconsistent {
        db: db.to_string(),
        why: why.to_string(),
    }
}

/// The backing directory as capture holds it (`O_PATH`), for tests that
/// build a `Capture` without a mount.
#[cfg(test)]
pub(crate) fn open_root(dir: &std::path::Path) -> OwnedFd {
    let fd = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    // SAFETY: `open` just returned this descriptor, and nothing else owns it.
    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
}

/// The path class of a file the recording VFS saw change, for the tests
/// that feed its events to capture as the FUSE layer would.
#[cfg(test)]
pub(crate) fn class_of(k: &crate::sqlite::testvfs::Kind, db: &str) -> Option<PathClass> {
    use crate::sqlite::testvfs::Kind;
    match k {
        Kind::Db => Some(PathClass::Database(db.into())),
        Kind::Wal => Some(PathClass::Sidecar(db.into(), Sidecar::Wal)),
        Kind::Journal => Some(PathClass::Sidecar(db.into(), Sidecar::Journal)),
        Kind::Other => None,
    }
}

#[cfg(test)]
mod tests;
