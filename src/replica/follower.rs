//! The secondary's follower: keeps each replicated database at the bucket's head.
//!
//! It polls `manifest.json` with `If-None-Match` (a cheap 304 when nothing
//! moved), verifies new segments (txid chain, epoch, pre/post checksums) and
//! applies them to the backing file the way a SQLite writer would: PENDING then
//! EXCLUSIVE on the database, taken through the mount so readers' locks count
//! (new readers wait, current ones finish), pages written, the presented change
//! counter bumped, the kernel's cached pages dropped, locks released. A reader
//! therefore sees each batch of transactions whole. A database with no usable
//! local state (first mount, broken chain, checksum mismatch, new generation)
//! is rebuilt from the latest snapshot through the same verified restore path.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::hydrate::{ReadThrough, State};
use super::manifest::{parse_hex64, DbManifest, Manifest};
use super::node::{Node, Role};
use super::restore::{self, RestoreOptions, Target};
use crate::fs::Invalidator;
use crate::journal::codec;
use crate::remote::{Layout, ObjectStore, StoreError};
use crate::sqlite::checksum::PageHashes;
use crate::sqlite::header::PENDING_BYTE;
use crate::status::Status;

/// Where the local copy of one database stands.
struct Applied {
    txid: u64,
    generation: u64,
    /// Whole-database checksum at `txid`.
    checksum: u64,
    page_size: u32,
    /// Per-page hashes, once the file is whole locally (None while it is
    /// hydrating: transactions are then verified by their checksum chain,
    /// and the whole file is hashed when hydration ends).
    hashes: Option<PageHashes>,
    /// Commit time of the last applied transaction (for the lag).
    committed_ms: Option<i64>,
}

pub struct Follower {
    pub store: Arc<dyn ObjectStore>,
    pub layout: Layout,
    pub canonical_id: String,
    /// `/proc/self/fd/<dir fd>`: the backing directory under the mount.
    pub backing: PathBuf,
    pub mount_dir: PathBuf,
    pub state_dir: PathBuf,
    pub node: Arc<Node>,
    pub invalidator: Arc<Invalidator>,
    pub status: Status,
    pub poll: Duration,
    pub read_through: Arc<ReadThrough>,
}

#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Restore(#[from] restore::RestoreError),
    #[error("{0}")]
    Other(String),
}

impl Follower {
    /// Follows until the runtime stops. `first` fires after the first poll
    /// (whatever its outcome), so the mount can wait until a secondary
    /// serves its databases before saying it is ready.
    pub async fn run(self, first: tokio::sync::oneshot::Sender<()>) {
        let mut applied: HashMap<String, Applied> = HashMap::new();
        let mut etag: Option<String> = None;
        let mut first = Some(first);
        loop {
            if first.is_none() {
                tokio::time::sleep(self.poll).await;
            }
            if !matches!(self.node.role(), Role::Secondary | Role::CatchingUp) {
                // The primary's own capture is the truth while it writes.
                applied.clear();
                etag = None;
                if let Some(f) = first.take() {
                    let _ = f.send(());
                }
                continue;
            }
            let res = self.tick(&mut applied, &etag).await;
            if let Some(f) = first.take() {
                let _ = f.send(());
            }
            if let Err(e) = self.check_hydrated(&mut applied).await {
                tracing::warn!(error = %e, "follower: hydration check failed");
                self.status.update(|s| s.last_error = Some(e.to_string()));
            }
            match res {
                Ok(Some(e)) => etag = Some(e),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "follower: could not refresh; retrying");
                    self.status.update(|s| s.last_error = Some(e.to_string()));
                    etag = None;
                }
            }
            self.publish_lag(&applied);
        }
    }

    fn publish_lag(&self, applied: &HashMap<String, Applied>) {
        let now = chrono::Utc::now().timestamp_millis();
        self.status.update(|s| {
            for (db, a) in applied {
                let d = s.databases.entry(db.clone()).or_default();
                d.applied_txid = a.txid;
                d.lag_seconds = if d.head_txid <= a.txid {
                    Some(0.0)
                } else {
                    a.committed_ms.map(|c| (now - c).max(0) as f64 / 1000.0)
                };
            }
        });
    }

    /// One poll; returns the manifest's new ETag when it changed and was applied.
    async fn tick(
        &self,
        applied: &mut HashMap<String, Applied>,
        etag: &Option<String>,
    ) -> Result<Option<String>, FollowError> {
        let key = self.layout.manifest();
        let got = match etag {
            Some(e) => self.store.get_if_none_match(&key, e).await,
            None => self.store.get(&key).await.map(Some),
        };
        let got = match got {
            Ok(Some(g)) => g,
            Ok(None) | Err(StoreError::NotModified { .. }) | Err(StoreError::NotFound { .. }) => {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
        let m = Manifest::parse(&key, &got.body, &self.canonical_id)
            .map_err(|e| FollowError::Other(e.to_string()))?;
        for (db, d) in &m.databases {
            self.status.update(|s| {
                s.databases.entry(db.clone()).or_default().head_txid = d.head_txid;
            });
            self.follow(db, d, &m, applied).await?;
        }
        Ok(Some(got.etag))
    }

    async fn follow(
        &self,
        db: &str,
        d: &DbManifest,
        m: &Manifest,
        applied: &mut HashMap<String, Applied>,
    ) -> Result<(), FollowError> {
        let head_sum = parse_hex64(&d.head_checksum);
        if !applied.contains_key(db) {
            // First sight: the local file may already be at the head.
            if let Ok(h) = PageHashes::from_file(&self.backing.join(db), d.page_size) {
                if Some(h.checksum()) == head_sum && h.page_count() == d.size_pages {
                    applied.insert(
                        db.to_string(),
                        Applied {
                            txid: d.head_txid,
                            generation: d.generation,
                            checksum: h.checksum(),
                            page_size: d.page_size,
                            hashes: Some(h),
                            committed_ms: None,
                        },
                    );
                    return Ok(());
                }
            }
        }
        let fresh = match applied.get(db) {
            Some(a) => a.generation != d.generation || a.txid > d.head_txid,
            None => true,
        };
        if fresh {
            let a = match self.bootstrap_lazy(db).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(db, error = %e, "cannot serve from the snapshot before it is local; downloading it whole");
                    self.bootstrap(db, d.generation).await?
                }
            };
            applied.insert(db.to_string(), a);
            return Ok(());
        }
        let a = applied.get_mut(db).expect("present");
        if a.txid == d.head_txid {
            return Ok(());
        }
        match self.catch_up(db, d, m, a).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(db, error = %e, "follower: segments do not continue the local copy; rebuilding from the snapshot");
                let a = self.bootstrap(db, d.generation).await?;
                applied.insert(db.to_string(), a);
                Ok(())
            }
        }
    }

    /// Apply the segments from the local txid to the head, as one locked batch.
    async fn catch_up(
        &self,
        db: &str,
        d: &DbManifest,
        m: &Manifest,
        a: &mut Applied,
    ) -> Result<(), FollowError> {
        let prefix = self.layout.segment_prefix(db);
        let mut segs: Vec<(u64, String)> = self
            .store
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                let k = self.layout.parse_segment(&o.key)?;
                (k.db == db).then_some((k.from, o.key))
            })
            .collect();
        segs.sort();
        let mut hashes = a.hashes.clone();
        let mut running = a.checksum;
        let mut txid = a.txid;
        let mut pages: BTreeMap<u32, Bytes> = BTreeMap::new();
        let mut size = hashes.as_ref().map_or(d.size_pages, |h| h.page_count());
        let mut last_ms = a.committed_ms;
        'chain: while txid < d.head_txid {
            for (_, key) in segs.iter().filter(|(from, _)| *from == txid + 1) {
                let body = self.store.get(key).await?.body;
                let Ok(seg) = codec::decode_segment(&body) else {
                    continue;
                };
                if seg.header.pre_checksum != running
                    || seg
                        .txns
                        .iter()
                        .any(|t| m.epoch_of(db, t.txid).is_some_and(|e| e != t.epoch))
                {
                    continue; // a deposed primary's tail
                }
                for t in seg.txns.iter().take_while(|t| t.txid <= d.head_txid) {
                    if t.pre_checksum != running {
                        return Err(FollowError::Other(format!(
                            "{key}: txid {} does not continue the checksum chain",
                            t.txid
                        )));
                    }
                    let post = match hashes.as_mut() {
                        Some(h) => h
                            .apply(
                                t.pages.iter().map(|(n, p)| (*n, p.as_ref())),
                                t.db_size_pages,
                            )
                            .map_err(|e| FollowError::Other(format!("{key}: {e}")))?,
                        None => t.post_checksum,
                    };
                    running = t.post_checksum;
                    if post != t.post_checksum {
                        return Err(FollowError::Other(format!(
                            "{key}: txid {} does not produce its checksum",
                            t.txid
                        )));
                    }
                    size = t.db_size_pages;
                    pages.retain(|p, _| *p <= size);
                    for (n, p) in &t.pages {
                        pages.insert(*n, p.clone());
                    }
                    txid = t.txid;
                    last_ms = Some(t.timestamp_ms);
                }
                continue 'chain;
            }
            return Err(FollowError::Other(format!(
                "no verifiable segment starts at txid {}",
                txid + 1
            )));
        }
        if Some(running) != parse_hex64(&d.head_checksum) {
            return Err(FollowError::Other(format!(
                "{db}: after txid {txid} the checksum is not the manifest's"
            )));
        }
        let (ps, rt, name) = (d.page_size, self.read_through.clone(), db.to_string());
        self.locked_install(db, move |f| rt.apply(&name, f, &pages, size, ps))
            .await?;
        tracing::debug!(db, from = a.txid + 1, to = txid, "applied");
        self.status.metrics().txns_applied(db, txid - a.txid);
        a.txid = txid;
        a.checksum = running;
        a.hashes = hashes;
        a.committed_ms = last_ms;
        Ok(())
    }

    /// Serve `db` at the head before it is local: lay the file out at the
    /// head's size, write the pages changed since the snapshot, and let
    /// read-through and the hydrator bring in the snapshot's pages.
    async fn bootstrap_lazy(&self, db: &str) -> Result<Applied, FollowError> {
        let start =
            restore::open_lazy(self.store.as_ref(), &self.layout, &self.canonical_id, db).await?;
        self.keep_aside(db);
        self.status.metrics().bootstrap(db);
        let a = Applied {
            txid: start.txid,
            generation: start.generation,
            checksum: start.checksum,
            page_size: start.page_size,
            hashes: None,
            committed_ms: start.commit_ms,
        };
        let (rt, name) = (self.read_through.clone(), db.to_string());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.locked_install(db, move |f| {
            let ps = u64::from(start.page_size);
            f.set_len(0)?;
            f.set_len(u64::from(start.size_pages) * ps)?;
            for (pgno, page) in &start.overlay {
                f.write_all_at(page, (u64::from(*pgno) - 1) * ps)?;
            }
            let h = rt.install(
                &name,
                &start.snapshot_key,
                start.reader,
                f.try_clone()?,
                start.overlay.keys().copied(),
                start.size_pages,
            );
            let _ = tx.send(h);
            Ok(())
        })
        .await?;
        if let Ok(h) = rx.await {
            tokio::spawn(self.read_through.clone().hydrate(h));
        }
        tracing::info!(
            db,
            txid = a.txid,
            downloaded = start.bytes_downloaded,
            "serving from the bucket while the local copy hydrates"
        );
        Ok(a)
    }

    /// Once a hydrating database is whole, hash it against the checksum of
    /// the txid it is at; a mismatch (or a failed hydration) rebuilds it from
    /// a full download.
    async fn check_hydrated(
        &self,
        applied: &mut HashMap<String, Applied>,
    ) -> Result<(), FollowError> {
        for (db, a) in applied.iter_mut() {
            if a.hashes.is_some() {
                continue;
            }
            let why = match self.read_through.state(db) {
                State::Running => continue,
                State::Failed(e) => e,
                State::None | State::Complete => {
                    let (path, page_size) = (self.backing.join(db), a.page_size);
                    let h = tokio::task::spawn_blocking(move || {
                        PageHashes::from_file(&path, page_size)
                    })
                    .await
                    .map_err(|e| FollowError::Other(e.to_string()))?
                    .map_err(|e| FollowError::Other(format!("{db}: {e}")))?;
                    if h.checksum() == a.checksum {
                        tracing::info!(db = %db, txid = a.txid, "hydrated copy verified");
                        a.hashes = Some(h);
                        self.read_through.remove(db);
                        self.status.update(|s| {
                            if let Some(h) =
                                s.databases.get_mut(db).and_then(|d| d.hydration.as_mut())
                            {
                                h.verified = true;
                            }
                        });
                        continue;
                    }
                    format!(
                        "the hydrated copy at txid {} has checksum {:016x}, expected {:016x}",
                        a.txid,
                        h.checksum(),
                        a.checksum
                    )
                }
            };
            tracing::error!(db = %db, error = %why, "hydration did not produce the head; downloading it whole");
            self.read_through.remove(db);
            let fresh = self.bootstrap(db, a.generation).await?;
            *a = fresh;
        }
        Ok(())
    }

    /// Rebuild the local copy from the latest snapshot and segments (verified
    /// by restore), keeping aside whatever the local file held.
    async fn bootstrap(&self, db: &str, generation: u64) -> Result<Applied, FollowError> {
        let dir = self.state_dir.join("bootstrap");
        std::fs::create_dir_all(&dir).map_err(|e| FollowError::Other(e.to_string()))?;
        let tmp = dir.join(db.replace('/', "%2F"));
        let report = restore::restore_with(
            self.store.as_ref(),
            &self.layout,
            &self.canonical_id,
            db,
            Target::Latest,
            &tmp,
            RestoreOptions {
                progress: true,
                force: true,
            },
        )
        .await?;
        let image = std::fs::read(&tmp).map_err(|e| FollowError::Other(e.to_string()))?;
        let hashes = PageHashes::from_bytes(&image, report.page_size)
            .map_err(|e| FollowError::Other(e.to_string()))?;
        self.keep_aside(db);
        let len = image.len() as u64;
        let (rt, name) = (self.read_through.clone(), db.to_string());
        self.locked_install(db, move |f| {
            rt.remove(&name);
            f.write_all_at(&image, 0)?;
            f.set_len(len)
        })
        .await?;
        let _ = std::fs::remove_file(&tmp);
        self.status.metrics().bootstrap(db);
        tracing::info!(db, txid = report.txid, "local copy rebuilt from the bucket");
        Ok(Applied {
            txid: report.txid,
            generation,
            checksum: report.checksum,
            page_size: report.page_size,
            hashes: Some(hashes),
            committed_ms: report.commit_ms,
        })
    }

    /// Before replacing a local database that is not the bucket's: keep it
    /// and its `-wal` aside (see [`keep_aside`]).
    fn keep_aside(&self, db: &str) {
        keep_aside(&self.backing.join(db), db, &self.state_dir, true);
    }

    /// Take SQLite's PENDING and EXCLUSIVE locks through the mount, run
    /// `write` on the backing file, make readers see a new change counter and
    /// drop the kernel's cached pages, then release.
    async fn locked_install(
        &self,
        db: &str,
        write: impl FnOnce(&std::fs::File) -> std::io::Result<()> + Send + 'static,
    ) -> Result<(), FollowError> {
        let through_mount = self.mount_dir.join(db);
        let backing = self.backing.join(db);
        let node = self.node.clone();
        let inval = self.invalidator.clone();
        let name = db.to_string();
        let status = self.status.clone();
        let state_dir = self.state_dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            // Create it underneath first: through the mount a non-primary
            // refuses creating replicated files, the daemon's own included.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&backing)?;
            inval.invalidate_entry(&name);
            let guard = lock_exclusive(&through_mount, |holder| {
                let why = format!(
                    "{name}: waiting to apply transactions: {holder} holds the database \
                     open (a WAL connection from when this node was primary keeps its lock \
                     until it closes; restart that process)"
                );
                tracing::warn!("{why}");
                status.update(|s| s.last_error = Some(why));
            })?;
            // A WAL left from when this node was primary would be replayed
            // over these pages by the next WAL-mode opener. Nobody has it
            // open now: WAL connections keep a shared lock on the database.
            if ["-wal", "-shm"]
                .iter()
                .any(|x| std::fs::metadata(format!("{}{x}", backing.display())).is_ok())
            {
                keep_aside(&backing, &name, &state_dir, false);
            }
            write(&f)?;
            node.bump_view();
            inval.invalidate(&name, &[]);
            drop(guard);
            Ok(())
        })
        .await
        .map_err(|e| FollowError::Other(e.to_string()))?
        .map_err(|e| FollowError::Other(format!("{db}: applying: {e}")))
    }
}

/// Copy a local database (`with_main`) and its `-wal` to the state dir
/// (never silently dropped), and remove the `-wal`/`-shm`, whose stale
/// frames SQLite would otherwise replay over what the follower applied.
fn keep_aside(main: &Path, db: &str, state_dir: &Path, with_main: bool) {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let dir = state_dir.join("replaced");
    let suffixes: &[&str] = if with_main { &["", "-wal"] } else { &["-wal"] };
    for suffix in suffixes {
        let src = PathBuf::from(format!("{}{suffix}", main.display()));
        if std::fs::metadata(&src).is_ok_and(|m| m.len() > 0) {
            let _ = std::fs::create_dir_all(&dir);
            let dst = dir.join(format!("{}-{stamp}{suffix}", db.replace('/', "%2F")));
            match std::fs::copy(&src, &dst) {
                Ok(_) => {
                    tracing::info!(from = %src.display(), to = %dst.display(), "kept the local copy aside")
                }
                Err(e) => tracing::warn!(error = %e, "could not keep the local copy aside"),
            }
        }
    }
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", main.display()));
    }
}

/// How long a reader may hold the database before the wait is reported.
const STUCK_AFTER: Duration = Duration::from_secs(5);

/// An open fd holding SQLite's PENDING and EXCLUSIVE locks; closing releases.
/// Blocks while readers finish; if one holds on past [`STUCK_AFTER`],
/// `stuck` is told who it is (once), since only that process can end it.
fn lock_exclusive(
    path: &Path,
    stuck: impl FnOnce(String) + Send,
) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let range = |start: u64, len: i64, kind: i32| libc::flock {
        l_type: kind as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: start as i64,
        l_len: len,
        l_pid: 0,
    };
    let ranges = [(PENDING_BYTE, 1), (PENDING_BYTE + 2, 510)];
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let t = std::time::Instant::now();
            while t.elapsed() < STUCK_AFTER {
                if done.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // Our own locks never show up in F_GETLK: any answer is another process.
            let (start, len) = ranges[1];
            let mut probe = range(start, len, libc::F_WRLCK);
            if !done.load(std::sync::atomic::Ordering::Acquire)
                && unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut probe) } == 0
                && probe.l_type != libc::F_UNLCK as i16
            {
                let cmd = std::fs::read(format!("/proc/{}/cmdline", probe.l_pid))
                    .map(|c| {
                        String::from_utf8_lossy(&c)
                            .replace('\0', " ")
                            .trim()
                            .to_string()
                    })
                    .unwrap_or_default();
                stuck(format!("pid {} ({cmd})", probe.l_pid));
            }
        });
        let res = (|| {
            for (start, len) in ranges {
                let fl = range(start, len, libc::F_WRLCK);
                loop {
                    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLKW, &fl) } == 0 {
                        break;
                    }
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EINTR) {
                        return Err(e);
                    }
                }
            }
            Ok(())
        })();
        done.store(true, std::sync::atomic::Ordering::Release);
        res
    })?;
    Ok(f)
}
