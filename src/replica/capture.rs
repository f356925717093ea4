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
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Where captured state lives: the journal, base images, the uploader's wake-up.
pub struct Capture {
    root: OwnedFd,
    journal: Arc<Journal>,
    base_dir: PathBuf,
    epoch: Arc<AtomicU64>,
    wake: Arc<tokio::sync::Notify>,
    status: Status,
    dbs: Mutex<HashMap<String, Arc<Mutex<DbCapture>>>>,
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

    /// Reconcile `db`'s backing files with the journal before the mount serves
    /// anything: capture committed WAL frames the journal lacks, or start a new
    /// generation (a fresh base image, logged) when the two cannot be reconciled.
    /// Must run while nothing else writes the database (before mounting).
    pub fn recover(&self, db: &str) -> Result<()> {
        let io = Self::io(db);
        let Some(main) = self.open(db).map_err(&io)? else {
            return Ok(()); // no database (yet): nothing to reconcile
        };
        let wal_file = self.open(&format!("{db}-wal")).map_err(&io)?;
        let mut tracker = WalTracker::new();
        let wal_txns = match &wal_file {
            Some(f) => tracker.scan(f).map_err(&io)?,
            None => Vec::new(),
        };
        let mut head_buf = [0u8; 100];
        let n = main.read_at(&mut head_buf, 0).map_err(&io)?;
        let header = DbHeader::parse(&head_buf[..n]).ok();
        let page_size = match (wal_txns.first(), &header) {
            (Some(t), _) => t.page_size,
            (None, Some(h)) => h.page_size,
            (None, None) if n == 0 => return Ok(()), // empty file: SQLite has not written it
            (None, None) => {
                return Err(CaptureError::Inconsistent {
                    db: db.into(),
                    why: "not a SQLite database (bad header); refusing to replicate it".into(),
                })
            }
        };
        let file_len = main.metadata().map_err(&io)?.len();
        let mut hashes = PageHashes::from_reader(&main, page_size).map_err(&io)?;
        let main_size = match &header {
            Some(h) if h.size_is_valid() && h.size_in_pages > 0 => h.size_in_pages,
            _ => (file_len / page_size as u64) as u32,
        };
        hashes
            .apply(std::iter::empty(), main_size)
            .map_err(|e| inconsistent(db, e))?;
        let journal_head = self.journal.head(db)?;
        // The journal holds the state after some prefix of the WAL's committed
        // transactions (all of them, normally). Find the last prefix whose state
        // has the journal head's checksum: what follows it reached the file but
        // not the journal (a crash between the two) and is captured now.
        let mut captured = None;
        if let Some(h) = journal_head.as_ref().filter(|h| h.page_size == page_size) {
            let mut probe = hashes.clone();
            if probe.checksum() == h.head_checksum {
                captured = Some(0);
            }
            for (i, t) in wal_txns.iter().enumerate() {
                apply_wal(&mut probe, t).map_err(|e| inconsistent(db, e))?;
                if probe.checksum() == h.head_checksum {
                    captured = Some(i + 1);
                }
            }
        }
        let done = captured.unwrap_or(wal_txns.len());
        for t in &wal_txns[..done] {
            apply_wal(&mut hashes, t).map_err(|e| inconsistent(db, e))?;
        }
        let mut state = DbCapture {
            name: db.to_string(),
            head: journal_head
                .clone()
                .unwrap_or_else(|| empty_head(db, page_size)),
            hashes,
            tracker,
            wal: wal_file,
            detector: CommitDetector::new(false),
            dirty: Vec::new(),
            unjournaled: false,
        };
        if captured.is_some() {
            let missing = &wal_txns[done..];
            if !missing.is_empty() {
                tracing::warn!(
                    db,
                    count = missing.len(),
                    "capturing committed WAL transactions the journal lacked"
                );
            }
            for t in missing {
                self.commit(&mut state, wal_pages(t), t.db_size_pages)?;
            }
        } else {
            self.new_generation(&mut state, &main, &wal_txns, journal_head.as_ref())?;
        }
        self.publish(db, &state);
        self.dbs
            .lock()
            .unwrap()
            .insert(db.to_string(), Arc::new(Mutex::new(state)));
        Ok(())
    }

    /// Start history over from the database as it is now: a base image of the
    /// current logical state (main file + committed WAL frames), at a txid past
    /// anything used before, so txids are never reused.
    fn new_generation(
        &self,
        st: &mut DbCapture,
        main: &File,
        wal_txns: &[WalTxn],
        old: Option<&DbHead>,
    ) -> Result<()> {
        let db = st.name.clone();
        let io = Self::io(&db);
        let page_size = st.hashes.page_size();
        let size = st.hashes.page_count();
        let (generation, txid) = match old {
            Some(h) => (h.generation + 1, h.head_txid + 1),
            None => (1, 0),
        };
        std::fs::create_dir_all(&self.base_dir).map_err(&io)?;
        let path = base_path(&self.base_dir, &db, txid);
        let tmp = path.with_extension("tmp");
        {
            let out = File::create(&tmp).map_err(&io)?;
            let mut buf = vec![0u8; page_size as usize];
            for pgno in 1..=size {
                buf.fill(0);
                main.read_at(&mut buf, (pgno as u64 - 1) * page_size as u64)
                    .map_err(&io)?;
                out.write_all_at(&buf, (pgno as u64 - 1) * page_size as u64)
                    .map_err(&io)?;
            }
            for t in wal_txns {
                for (pgno, page) in &t.pages {
                    if *pgno <= size {
                        out.write_all_at(page, (*pgno as u64 - 1) * page_size as u64)
                            .map_err(&io)?;
                    }
                }
            }
            out.set_len(size as u64 * page_size as u64).map_err(&io)?;
            out.sync_all().map_err(&io)?;
        }
        let check = PageHashes::from_file(&tmp, page_size).map_err(&io)?;
        if check.checksum() != st.hashes.checksum() {
            return Err(inconsistent(
                &db,
                "base image does not match the database it was read from",
            ));
        }
        std::fs::rename(&tmp, &path).map_err(&io)?;
        if let Some(h) = old {
            tracing::warn!(
                db = %db, old_generation = h.generation, generation, txid,
                "the database and the local journal disagree (changed outside membridge?): starting a new generation from a fresh snapshot"
            );
        } else {
            tracing::info!(db = %db, txid, "first capture of this database: base snapshot taken");
        }
        st.head = DbHead {
            name: db.clone(),
            page_size,
            generation,
            head_txid: txid,
            head_checksum: st.hashes.checksum(),
            size_pages: size,
            uploaded_txid: 0,
            base_txid: txid,
        };
        self.journal.start_generation(&st.head)?;
        self.wake.notify_one();
        Ok(())
    }

    /// Promotion: the local file holds exactly the bucket's head (the
    /// follower's verified copy). Make it the start of this node's history,
    /// with a base image for later snapshots. `Ok(false)` if it does not match.
    /// The replicated databases this node knows (journaled or being captured).
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

    pub fn adopt(&self, db: &str, d: &crate::replica::manifest::DbManifest) -> Result<bool> {
        let io = Self::io(db);
        let Some(main) = self.open(db).map_err(&io)? else {
            return Ok(false);
        };
        let wal_len = std::fs::metadata(self.backing(&format!("{db}-wal"))).map(|m| m.len());
        if let Some(n) = wal_len.ok().filter(|n| *n > 0) {
            tracing::info!(db, wal_bytes = n, "not adopting: the -wal holds frames");
            return Ok(false); // frames the bucket does not have: not the head
        }
        let mut hashes = PageHashes::from_reader(&main, d.page_size).map_err(&io)?;
        hashes
            .apply(std::iter::empty(), d.size_pages)
            .map_err(|e| inconsistent(db, e))?;
        if Some(hashes.checksum()) != crate::replica::manifest::parse_hex64(&d.head_checksum) {
            tracing::info!(
                db,
                local = format!("{:016x}", hashes.checksum()),
                head = %d.head_checksum,
                "not adopting: the local file is not the bucket's head"
            );
            return Ok(false);
        }
        std::fs::create_dir_all(&self.base_dir).map_err(&io)?;
        let base = base_path(&self.base_dir, db, d.head_txid);
        let tmp = base.with_extension("tmp");
        std::fs::copy(self.backing(db), &tmp).map_err(&io)?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .and_then(|f| f.set_len(d.size_pages as u64 * d.page_size as u64))
            .map_err(&io)?;
        std::fs::rename(&tmp, &base).map_err(&io)?;
        let head = DbHead {
            name: db.to_string(),
            page_size: d.page_size,
            generation: d.generation,
            head_txid: d.head_txid,
            head_checksum: hashes.checksum(),
            size_pages: d.size_pages,
            uploaded_txid: d.head_txid,
            base_txid: d.head_txid,
        };
        self.journal.start_generation(&head)?;
        let state = DbCapture {
            name: db.to_string(),
            head,
            hashes,
            tracker: WalTracker::new(),
            wal: None,
            detector: CommitDetector::new(false),
            dirty: Vec::new(),
            unjournaled: false,
        };
        self.publish(db, &state);
        self.dbs
            .lock()
            .unwrap()
            .insert(db.to_string(), Arc::new(Mutex::new(state)));
        tracing::info!(
            db,
            txid = d.head_txid,
            "adopted the bucket's head as this node's history"
        );
        Ok(true)
    }

    /// Fencing: this node lost the lease with transactions the bucket never
    /// got. Each such database is written out as it stood locally (the base
    /// image plus the journal) with a JSON report, under `divergent/` in the state dir —
    /// never silently dropped, never merged — and capture forgets it, so the
    /// follower can bring the bucket's history back.
    pub fn set_aside(&self, epoch: u64, node: &str, reason: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let heads = self.journal.heads().unwrap_or_default();
        for h in heads.iter().filter(|h| h.head_txid > h.uploaded_txid) {
            let dir = self.base_dir.with_file_name("divergent");
            let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
            let stem = format!("{}-epoch{epoch}-{stamp}", h.name.replace('/', "%2F"));
            let path = dir.join(format!("{stem}.db"));
            let made = std::fs::create_dir_all(&dir)
                .map_err(|e| e.to_string())
                .and_then(|_| {
                    crate::journal::base::materialize(
                        &self.journal,
                        &self.base_dir,
                        h,
                        h.head_txid,
                        &path,
                    )
                    .map_err(|e| e.to_string())
                });
            let report = serde_json::json!({
                "database": h.name,
                "node": node,
                "epoch": epoch,
                "reason": reason,
                "published_txid": h.uploaded_txid,
                "local_head_txid": h.head_txid,
                "unpublished_txids": [h.uploaded_txid + 1, h.head_txid],
                "unpublished_count": h.head_txid - h.uploaded_txid,
                "local_checksum": format!("{:016x}", h.head_checksum),
                "copy": made.as_ref().ok().map(|_| path.display().to_string()),
                "copy_error": made.as_ref().err(),
                "created_at": chrono::Utc::now().to_rfc3339(),
            });
            let report_path = dir.join(format!("{stem}.json"));
            let _ = std::fs::write(
                &report_path,
                serde_json::to_vec_pretty(&report).unwrap_or_default(),
            );
            tracing::warn!(
                db = %h.name,
                unpublished = h.head_txid - h.uploaded_txid,
                copy = %path.display(),
                report = %report_path.display(),
                "fenced: unpublished transactions kept aside as a divergent copy"
            );
            out.push(report_path);
        }
        self.dbs.lock().unwrap().clear();
        out
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

    /// Record one committed transaction: journal first, then the in-memory head.
    fn commit(&self, st: &mut DbCapture, pages: Vec<(u32, Bytes)>, size: u32) -> Result<()> {
        if st.head.page_size == 0 {
            // A database created under the mount: its history starts empty.
            let Some(ps) = pages.first().map(|(_, p)| p.len() as u32) else {
                return Ok(());
            };
            st.hashes = PageHashes::new(ps).map_err(|e| inconsistent(&st.name, e))?;
            st.head = DbHead {
                generation: 1,
                ..empty_head(&st.name, ps)
            };
            let io = Self::io(&st.name);
            std::fs::create_dir_all(&self.base_dir).map_err(&io)?;
            File::create(base_path(&self.base_dir, &st.name, 0)).map_err(&io)?;
            self.journal.start_generation(&st.head)?;
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
        self.status.update(|s| {
            let d = s.databases.entry(db.to_string()).or_default();
            d.head_txid = head;
            // Txids are consecutive: what is not uploaded yet is the backlog
            // (the uploader refreshes it from the journal after each round).
            d.backlog = head.saturating_sub(d.uploaded_txid);
        });
    }

    fn wal_written(&self, st: &mut DbCapture, offset: u64, len: u64) -> Result<()> {
        if !st.tracker.note_write(offset, len) {
            return Ok(());
        }
        let db = st.name.clone();
        if st.wal.is_none() {
            st.wal = self.open(&format!("{db}-wal")).map_err(Self::io(&db))?;
        }
        let Some(wal) = &st.wal else {
            return Ok(());
        };
        let txns = st.tracker.scan(wal).map_err(Self::io(&db))?;
        for t in &txns {
            self.commit(st, wal_pages(t), t.db_size_pages)?;
        }
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

    /// Capture the database pages written since the journal went hot.
    fn capture_main(&self, st: &mut DbCapture) -> Result<()> {
        let ranges = std::mem::take(&mut st.dirty);
        st.unjournaled = false;
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
            st.hashes = PageHashes::from_reader(&main, ps as u32).map_err(&io)?;
            st.hashes
                .apply(std::iter::empty(), size)
                .map_err(|e| inconsistent(&db, e))?;
            return self.new_generation(st, &main, &[], Some(&old));
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
