//! The secondary's follower: keeps each replicated database at the bucket's head.
//!
//! It polls `manifest.json` with `If-None-Match` (a cheap 304 when nothing
//! moved), verifies new segments (txid chain, epoch, pre/post checksums) and
//! hands each transaction to the view applier ([`super::apply`]), which
//! commits it as a real SQLite WAL transaction through the mount: readers keep
//! their snapshot or see the transaction whole, and nobody waits. A database
//! with no usable local state (first mount, broken chain, checksum mismatch,
//! new generation) is laid out from the latest snapshot directly when no
//! client has it open, or else committed whole through the applier; see
//! docs/ARCHITECTURE.md, "The view on a secondary".

use std::collections::{BTreeSet, HashMap};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::apply::ViewTxn;
use super::divergent;
use super::hydrate::{ReadThrough, State};
use super::manifest::{parse_hex64, DbManifest, Manifest};
use super::node::{Node, Role};
use super::restore::{self, RestoreOptions, Target};
use super::verify::{Chain, VerifyError};
use crate::fs::Invalidator;
use crate::journal::{codec, Journal};
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
    /// This node's journal: a database it holds unpublished transactions
    /// of is not followed over (see [`hold_unpublished`]).
    pub journal: Arc<Journal>,
    pub node_id: String,
}

/// The page hashes of the (settled) file at `path` if it is exactly the
/// bucket's head `d`: then it is followed from there, nothing is laid out.
/// The model test (`replica::model`) runs this same check.
pub fn at_head(path: &Path, d: &DbManifest) -> Option<PageHashes> {
    let h = PageHashes::from_file(path, d.page_size).ok()?;
    (Some(h.checksum()) == parse_hex64(&d.head_checksum) && h.page_count() == d.size_pages)
        .then_some(h)
}

/// Issue 11, item 2: a node whose journal holds transactions the bucket does
/// not have (a restarting primary with a backlog, a compare-and-swap whose
/// answer was lost) must never have that database replaced by the bucket's
/// head, nor be promoted later on the replaced file. Judged each time the
/// bucket moves, with the check a start runs ([`divergent::diverged`]): what
/// the bucket's history went past is set aside as divergent (then the
/// database is followed again); the rest is held, left as it is for the
/// take-over to publish. Returns the databases held and a line per copy set
/// aside. The model test (`replica::model`) runs this same function.
pub async fn hold_unpublished(
    store: &dyn ObjectStore,
    layout: &Layout,
    canonical_id: &str,
    journal: &Journal,
    state_dir: &Path,
    node_id: &str,
) -> Result<(BTreeSet<String>, Vec<String>), String> {
    // Past what was published or set aside: unpublished transactions, or a
    // new generation whose snapshot is not up yet (its head has no txn row).
    let ahead = |h: &crate::journal::DbHead| {
        let aside = journal.divergent_through(&h.name).ok().flatten();
        h.head_txid > h.uploaded_txid.max(aside.unwrap_or(0))
    };
    let pending = |journal: &Journal| -> Result<BTreeSet<String>, String> {
        Ok(journal
            .heads()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|h| ahead(h))
            .map(|h| h.name)
            .collect())
    };
    if pending(journal)?.is_empty() {
        return Ok(Default::default());
    }
    let mut notes = Vec::new();
    for (h, why, epoch) in divergent::diverged(store, layout, canonical_id, journal).await? {
        divergent::set_aside(
            journal,
            &state_dir.join("base"),
            &divergent::dir(state_dir),
            &h,
            node_id,
            Some(epoch),
            &why,
        );
        notes.push(format!(
            "{}: txids {}..={} set aside: {why}",
            h.name,
            h.uploaded_txid + 1,
            h.head_txid
        ));
    }
    Ok((pending(journal)?, notes))
}

#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Restore(#[from] restore::RestoreError),
    /// A transaction failed the shared checks (module verify).
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Clients have the database open: it cannot be laid out underneath them.
    #[error("the database is open by {0}")]
    Busy(String),
    #[error(transparent)]
    Manifest(#[from] super::manifest::ManifestError),
    /// Judging this node's unpublished transactions against the bucket
    /// failed ([`hold_unpublished`]; the journal or the bucket, said in words).
    #[error("{0}")]
    Unpublished(String),
    #[error(transparent)]
    Files(#[from] super::files::FilesError),
    /// A segment's transaction does not apply to the running page hashes.
    #[error("{key}: {source}")]
    Pages {
        key: String,
        source: crate::sqlite::checksum::ChecksumError,
    },
    /// The bucket has no segment continuing the chain at `txid`.
    #[error("no verifiable segment starts at txid {txid}")]
    NoSegment { txid: u64 },
    /// The chain reached the head with another checksum than the manifest's.
    #[error("{db}: after txid {txid} the checksum is not the manifest's")]
    HeadChecksum { db: String, txid: u64 },
    /// A local file could not be read, written or locked.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// The node has no view applier (it is not serving a view).
    #[error("no view applier")]
    NoApplier,
    /// The view's applier failed to commit the transactions.
    #[error("applying: {0}")]
    Apply(#[source] super::apply::ApplyError),
    /// The view's applier failed to close the view.
    #[error(transparent)]
    Close(super::apply::ApplyError),
    /// A blocking task panicked or was cancelled.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

impl FollowError {
    fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> FollowError {
        let what = what.to_string();
        move |source| FollowError::Io { what, source }
    }
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
                // Or sooner when asked (a promotion waits on the last segment).
                tokio::select! {
                    _ = tokio::time::sleep(self.poll) => {}
                    _ = self.node.poll_requested() => {}
                }
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
        for (db, a) in applied {
            self.node.views().applied(db, a.txid);
            self.status.applied(db, a.txid, a.committed_ms);
        }
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
        let m = Manifest::parse(&key, &got.body, &self.canonical_id)?;
        let (held, notes) = hold_unpublished(
            self.store.as_ref(),
            &self.layout,
            &self.canonical_id,
            &self.journal,
            &self.state_dir,
            &self.node_id,
        )
        .await
        .map_err(FollowError::Unpublished)?;
        for n in notes {
            tracing::warn!("follower: {n}");
        }
        for (db, d) in &m.databases {
            self.node.views().saw_head(db, d.head_txid);
            if held.contains(db) {
                tracing::info!(
                    db,
                    "not following: this node holds transactions the bucket does not have yet"
                );
                continue;
            }
            self.status.bucket_head(db, d.head_txid);
            self.follow(db, d, &m, applied).await?;
        }
        super::files::follow(self, &m).await?;
        Ok(Some(got.etag))
    }

    async fn follow(
        &self,
        db: &str,
        d: &DbManifest,
        m: &Manifest,
        applied: &mut HashMap<String, Applied>,
    ) -> Result<(), FollowError> {
        if !applied.contains_key(db) {
            // First sight: the local file (with whatever WAL is left, folded
            // in first) may already be at the head.
            self.settle(db, true).await;
            if let Some(h) = at_head(&self.backing.join(db), d) {
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
        // The same checks as restore (module verify); pages are hashed
        // unless the file is still hydrating.
        let mut chain = Chain::new(a.txid, a.checksum);
        let mut txns: Vec<ViewTxn> = Vec::new();
        let mut last_ms = a.committed_ms;
        'chain: while chain.at < d.head_txid {
            for (_, key) in segs.iter().filter(|(from, _)| *from == chain.at + 1) {
                let body = self.store.get(key).await?.body;
                let Ok(seg) = codec::decode_segment(&body) else {
                    continue;
                };
                let h = &seg.header;
                let owner = m.epoch_of(db, h.txid_to);
                let entered = chain.enters(
                    key,
                    (h.txid_from, h.txid_to),
                    h.epoch,
                    h.pre_checksum,
                    owner,
                );
                if entered.is_err()
                    || seg
                        .txns
                        .iter()
                        .any(|t| m.epoch_of(db, t.txid).is_some_and(|e| e != t.epoch))
                {
                    continue; // a deposed primary's tail
                }
                for t in seg.txns.iter().take_while(|t| t.txid <= d.head_txid) {
                    chain.apply(key, t, m.epoch_of(db, t.txid), |t| match hashes.as_mut() {
                        Some(h) => h
                            .apply(
                                t.pages.iter().map(|(n, p)| (*n, p.as_ref())),
                                t.db_size_pages,
                            )
                            .map(Some)
                            .map_err(|source| FollowError::Pages {
                                key: key.to_string(),
                                source,
                            }),
                        None => Ok(None),
                    })?;
                    txns.push(ViewTxn {
                        pages: t.pages.iter().map(|(n, p)| (*n, p.clone())).collect(),
                        size_pages: t.db_size_pages,
                    });
                    last_ms = Some(t.timestamp_ms);
                }
                continue 'chain;
            }
            return Err(FollowError::NoSegment { txid: chain.at + 1 });
        }
        let (txid, running) = (chain.at, chain.running);
        if Some(running) != parse_hex64(&d.head_checksum) {
            return Err(FollowError::HeadChecksum {
                db: db.to_string(),
                txid,
            });
        }
        self.apply_view(db, txns).await?;
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
        self.settle(db, false).await;
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
                    if !self.settle(db, false).await {
                        continue; // a reader kept the WAL busy: next round
                    }
                    let (path, page_size) = (self.backing.join(db), a.page_size);
                    let h = tokio::task::spawn_blocking(move || {
                        PageHashes::from_file(&path, page_size)
                    })
                    .await?
                    .map_err(FollowError::io(db))?;
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
        std::fs::create_dir_all(&dir).map_err(FollowError::io(dir.display()))?;
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
        // Hashed and installed from the file a buffer at a time: memory does
        // not grow with the database.
        let hashes = PageHashes::from_file(&tmp, report.page_size)
            .map_err(FollowError::io(tmp.display()))?;
        self.settle(db, false).await;
        self.keep_aside(db);
        let (rt, name, src) = (self.read_through.clone(), db.to_string(), tmp.clone());
        let installed = self
            .locked_install(db, move |f| {
                rt.remove(&name);
                let len = copy_at(&src, f)?;
                f.set_len(len)
            })
            .await;
        match installed {
            Ok(()) => {}
            Err(FollowError::Busy(holder)) => {
                // Clients have it open: commit the image whole, as one WAL
                // transaction they see atomically.
                tracing::info!(db, %holder, "the database is open: applying the rebuilt copy as one transaction");
                // That transaction holds every page: the one path here
                // whose memory is the database's size (docs/ARCHITECTURE.md).
                self.read_through.remove(db);
                let image = std::fs::read(&tmp).map_err(FollowError::io(tmp.display()))?;
                let ps = report.page_size as usize;
                let pages = image
                    .chunks(ps)
                    .enumerate()
                    .map(|(i, p)| (i as u32 + 1, Bytes::copy_from_slice(p)))
                    .filter(|(n, _)| *n != crate::sqlite::header::lock_byte_page(report.page_size))
                    .collect();
                let size_pages = (image.len() / ps) as u32;
                self.apply_view(db, vec![ViewTxn { pages, size_pages }])
                    .await?;
            }
            Err(e) => return Err(e),
        }
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

    /// Before replacing a local database that is not the bucket's: keep a
    /// copy of it and its `-wal` aside (see [`keep_aside`]).
    fn keep_aside(&self, db: &str) {
        keep_aside(&self.backing.join(db), db, &self.state_dir, true);
    }

    /// Commits verified transactions into the view (one SQLite transaction
    /// each) on the applier's thread.
    async fn apply_view(&self, db: &str, txns: Vec<ViewTxn>) -> Result<(), FollowError> {
        let Some(applier) = self.node.applier().cloned() else {
            return Err(FollowError::NoApplier);
        };
        let name = db.to_string();
        tokio::task::spawn_blocking(move || applier.apply(&name, txns))
            .await?
            .map_err(FollowError::Apply)
    }

    /// Folds the view's WAL into the main file (opening the view first when
    /// `open`); `false` if that could not be done now (a reader kept the WAL
    /// busy, or the file is not a database the view can open).
    async fn settle(&self, db: &str, open: bool) -> bool {
        let Some(applier) = self.node.applier().cloned() else {
            return true;
        };
        let name = db.to_string();
        let res = tokio::task::spawn_blocking(move || match open {
            true => applier.settle_open(&name),
            false => applier.settle(&name),
        })
        .await;
        match res {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::debug!(db, error = %e, "view not settled");
                false
            }
            Err(_) => false,
        }
    }

    /// Run `write` on the backing file while no connection has the database
    /// open: the applier's own is closed first, and SQLite's PENDING and
    /// EXCLUSIVE locks are taken through the mount with a bounded wait
    /// ([`FollowError::Busy`] names who holds it). The view is reopened after,
    /// so the `-wal` exists before any client looks for it.
    async fn locked_install(
        &self,
        db: &str,
        write: impl FnOnce(&std::fs::File) -> std::io::Result<()> + Send + 'static,
    ) -> Result<(), FollowError> {
        let through_mount = self.mount_dir.join(db);
        let backing = self.backing.join(db);
        let inval = self.invalidator.clone();
        let name = db.to_string();
        let state_dir = self.state_dir.clone();
        let applier = self.node.applier().cloned();
        let res = tokio::task::spawn_blocking(move || -> Result<(), FollowError> {
            if let Some(a) = &applier {
                a.close(Some(&name)).map_err(FollowError::Close)?;
            }
            let io = |source| FollowError::Io {
                what: format!("{name}: applying"),
                source,
            };
            // Create it underneath first: through the mount a non-primary
            // refuses creating replicated files, the daemon's own included.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&backing)
                .map_err(io)?;
            inval.invalidate_entry(&name);
            let guard = lock_exclusive(&through_mount)?;
            // Nobody has it open now (WAL connections keep a shared lock on
            // the database): a WAL left behind would be replayed over these
            // pages by the next opener.
            if ["-wal", "-shm"]
                .iter()
                .any(|x| std::fs::metadata(format!("{}{x}", backing.display())).is_ok())
            {
                keep_aside(&backing, &name, &state_dir, false);
                for suffix in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", backing.display()));
                }
                inval.invalidate_entry(&format!("{name}-wal"));
                inval.invalidate_entry(&format!("{name}-shm"));
            }
            write(&f).map_err(io)?;
            inval.invalidate(&name, &[]);
            drop(guard);
            if let Some(a) = &applier {
                a.forget_page1(&name);
            }
            Ok(())
        })
        .await?;
        res?;
        // Open the view again (it creates the -wal clients will need).
        self.settle(db, true).await;
        Ok(())
    }
}

/// Copy a local database (`with_main`) and its `-wal` to the state dir:
/// never silently dropped.
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
                Ok(_) => super::aside::kept(&src, &dst),
                Err(e) => tracing::warn!(error = %e, "could not keep the local copy aside"),
            }
        }
    }
}

/// How long the follower waits for clients to close the database before it
/// applies a rebuilt copy through the view instead.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// An open fd holding SQLite's PENDING and EXCLUSIVE locks; closing releases.
/// Never blocks a reader for long: each try takes PENDING, then the SHARED
/// range without waiting, and lets PENDING go again when a reader is in, for
/// at most [`LOCK_WAIT`]; then [`FollowError::Busy`] names the holder.
fn lock_exclusive(path: &Path) -> Result<std::fs::File, FollowError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(FollowError::io(path.display()))?;
    let range = |start: u64, len: i64, kind: i32| libc::flock {
        l_type: kind as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: start as i64,
        l_len: len,
        l_pid: 0,
    };
    let pending = range(PENDING_BYTE, 1, libc::F_WRLCK);
    let shared = range(PENDING_BYTE + 2, 510, libc::F_WRLCK);
    let set = |fl: &libc::flock| {
        // SAFETY: `f` is an open fd for the whole call and `fl` a valid flock.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, fl) == 0 }
    };
    let start = std::time::Instant::now();
    loop {
        if set(&pending) {
            if set(&shared) {
                return Ok(f);
            }
            set(&range(PENDING_BYTE, 1, libc::F_UNLCK));
        }
        if start.elapsed() > LOCK_WAIT {
            let mut probe = shared;
            // SAFETY: as above; F_GETLK only fills `probe`.
            let holder = if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut probe) } == 0
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
                format!("pid {} ({cmd})", probe.l_pid)
            } else {
                "another process".to_string()
            };
            return Err(FollowError::Busy(holder));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Copies the file at `src` over the start of `dst`, a buffer at a time;
/// returns the bytes copied.
fn copy_at(src: &Path, dst: &std::fs::File) -> std::io::Result<u64> {
    use std::io::Read;
    let mut r = std::fs::File::open(src)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(at);
        }
        dst.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
}
