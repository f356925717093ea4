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
}

mod install;
