//! The primary's uploader: journal → segments → manifest, off the write path.
//!
//! Woken by each capture, it waits a short batching window, then writes what
//! committed meanwhile as one create-only segment and advances `manifest.json`
//! by compare-and-swap. While the bucket is unreachable the journal's backlog
//! grows and writes go on; it drains when the bucket returns. Snapshots come
//! from a local base image (the last snapshot) advanced with journaled
//! transactions, so they never read the live database.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use super::manifest::{self, hex64, DbManifest, EpochStart, Manifest, SnapshotRef, Versioned};
use super::node::Node;
use crate::journal::base::{base_path, materialize, BaseError};
use crate::journal::codec::{self, SegmentMeta, SnapshotMeta};
use crate::journal::{DbHead, Journal};
use crate::metrics::Object;
use crate::remote::{Layout, ObjectStore, PutMode, StoreError};
use crate::sqlite::checksum::PageHashes;
use crate::status::Status;

/// Requests from the control socket (`membridge push`).
pub enum Command {
    /// Publish everything and take a snapshot now; the reply says what was done.
    Push(tokio::sync::oneshot::Sender<std::result::Result<String, String>>),
    /// Publish the backlog now, without a snapshot (a hand-over: the next
    /// primary continues this history, it needs no new starting point).
    Flush(tokio::sync::oneshot::Sender<std::result::Result<(), (Outcome, String)>>),
    /// This node took the lease at this epoch: check that the bucket's history
    /// is this node's, and bump the manifest's epoch before writes resume.
    TakeOver(
        u64,
        tokio::sync::oneshot::Sender<std::result::Result<(), NotYet>>,
    ),
}

/// Why a node holding the lease cannot take writes yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotYet {
    /// The manifest is at a later epoch than the lease (an old tool rewrote the
    /// lease with its own count, say): no retry at this epoch can succeed; the
    /// lease must be taken again above `manifest`.
    #[error("the manifest is at epoch {manifest}, newer than this lease's {lease}")]
    EpochBehind { manifest: u64, lease: u64 },
    /// Catching up, hydrating, the bucket: trying again later may succeed.
    #[error("{0}")]
    Wait(String),
}

/// What kind of failure stopped an upload: what the caller does next
/// depends on it, never on the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The bucket belongs to a newer epoch: this node was deposed. The roles
    /// module fences it (`super::roles`); the uploader only reports it.
    Fenced,
    /// The bucket disagrees with this node (another writer, a race lost too
    /// often, a request this role may not make): retrying as is will not help.
    Conflict,
    /// The bucket could not be reached, or a local step failed: retried.
    Transient,
}

/// The uploader found this node deposed while it wrote under `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    pub epoch: u64,
    pub why: String,
}

/// Knobs; the defaults suit claude-mem's write rate.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Wait this long after a wake-up so one segment carries the burst.
    pub batch_window: Duration,
    /// Upper bound of page bytes per segment.
    pub segment_bytes: usize,
    /// Take a snapshot after this many transactions since the last one...
    pub snapshot_txns: u64,
    /// ...or this many page bytes.
    pub snapshot_bytes: u64,
    pub retention: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            batch_window: Duration::from_millis(200),
            segment_bytes: 16 << 20,
            snapshot_txns: 10_000,
            snapshot_bytes: 256 << 20,
            retention: Duration::from_secs(7 * 86_400),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(transparent)]
    Journal(#[from] crate::journal::store::JournalError),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    #[error("base image of {db}: {source}")]
    Io { db: String, source: std::io::Error },
    #[error(transparent)]
    Files(#[from] super::files::FilesError),
    #[error("{0}")]
    Conflict(String),
    /// The bucket is at a newer epoch than the one this node wrote under.
    #[error("fenced: {0}")]
    Fenced(String),
    #[error(transparent)]
    EpochBehind(NotYet),
    /// Not this node's job in its current role (exit code 3 on the CLI).
    #[error("{0}")]
    Refused(String),
}

impl UploadError {
    /// The kind of failure (see [`Outcome`]).
    pub fn outcome(&self) -> Outcome {
        match self {
            UploadError::Fenced(_) => Outcome::Fenced,
            UploadError::Conflict(_) | UploadError::EpochBehind(_) | UploadError::Refused(_) => {
                Outcome::Conflict
            }
            _ => Outcome::Transient,
        }
    }

    /// The bucket could not be reached (as opposed to refusing or conflicting).
    pub fn is_unreachable(&self) -> bool {
        match self {
            UploadError::Store(e) | UploadError::Manifest(manifest::ManifestError::Store(e)) => {
                e.is_transient()
            }
            UploadError::Files(e) => e.is_unreachable(),
            _ => false,
        }
    }
}

type Result<T> = std::result::Result<T, UploadError>;

pub struct Uploader {
    store: Arc<dyn ObjectStore>,
    layout: Layout,
    project_id: String,
    canonical_id: String,
    node_id: String,
    journal: Arc<Journal>,
    base_dir: PathBuf,
    epoch: Arc<AtomicU64>,
    wake: Arc<Notify>,
    status: Status,
    policy: Policy,
    node: Arc<Node>,
    manifest: Option<Versioned>,
    last_prune: Option<Instant>,
    /// Replicated files were reconciled with the bucket since this node last
    /// became primary (see `super::files`).
    files_reconciled: bool,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Uploader {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn ObjectStore>,
        layout: Layout,
        project_id: String,
        canonical_id: String,
        node_id: String,
        journal: Arc<Journal>,
        base_dir: PathBuf,
        epoch: Arc<AtomicU64>,
        wake: Arc<Notify>,
        status: Status,
        policy: Policy,
        node: Arc<Node>,
    ) -> Uploader {
        Uploader {
            store,
            layout,
            project_id,
            canonical_id,
            node_id,
            journal,
            base_dir,
            epoch,
            wake,
            status,
            policy,
            node,
            manifest: None,
            last_prune: None,
            files_reconciled: false,
        }
    }

    /// Run until the process ends. Failures are reported in status and retried
    /// with backoff; nothing captured is dropped.
    /// A failure whose [`Outcome`] is `Fenced` is reported on `fenced` (the
    /// roles module decides what follows).
    pub async fn run(
        mut self,
        mut commands: tokio::sync::mpsc::Receiver<Command>,
        fenced: tokio::sync::mpsc::UnboundedSender<Fenced>,
    ) {
        let epoch = self.epoch.clone();
        let report = |e: &UploadError| {
            if let UploadError::Fenced(why) = e {
                let _ = fenced.send(Fenced {
                    epoch: epoch.load(Ordering::Acquire),
                    why: why.clone(),
                });
            }
        };
        let mut backoff = Duration::from_millis(500);
        let mut outage_since: Option<chrono::DateTime<chrono::Utc>> = None;
        loop {
            let mut cmd = tokio::select! {
                _ = self.wake.notified() => None,
                _ = tokio::time::sleep(Duration::from_secs(1)) => None,
                Some(cmd) = commands.recv() => Some(cmd),
            };
            let woke = cmd.is_none();
            if woke {
                // The batching window; a request (a hand-over's flush) ends it.
                cmd = tokio::select! {
                    _ = tokio::time::sleep(self.policy.batch_window) => None,
                    Some(cmd) = commands.recv() => Some(cmd),
                };
            }
            if let Some(cmd) = cmd {
                let published = matches!(cmd, Command::Push(_) | Command::Flush(_));
                match cmd {
                    Command::Push(reply) => {
                        let res = self.push().await.map_err(|e| match e {
                            UploadError::Refused(why) => format!("refused {why}"),
                            e => {
                                report(&e);
                                self.status.metrics().upload_failure(e.is_unreachable());
                                e.to_string()
                            }
                        });
                        let _ = reply.send(res);
                    }
                    Command::Flush(reply) => {
                        self.manifest = None;
                        let res = self.round().await.map_err(|e| {
                            report(&e);
                            (e.outcome(), e.to_string())
                        });
                        let _ = reply.send(res);
                    }
                    Command::TakeOver(epoch, reply) => {
                        let res = self.take_over(epoch).await.map_err(|e| match e {
                            UploadError::EpochBehind(n) => n,
                            e => NotYet::Wait(e.to_string()),
                        });
                        let _ = reply.send(res);
                    }
                }
                // What woke it is published already, or at the next round.
                if published || !woke {
                    continue;
                }
            }
            match self.round().await {
                Ok(()) => {
                    backoff = Duration::from_millis(500);
                    if let Some(since) = outage_since.take() {
                        let now = chrono::Utc::now();
                        tracing::info!(since = %since, "bucket reachable again; backlog drained");
                        self.status.update(|s| {
                            s.upload_state = "ok".into();
                            s.last_outage = Some(crate::status::Outage {
                                from: since.to_rfc3339(),
                                to: Some(now.to_rfc3339()),
                            });
                            s.last_error = None;
                        });
                    }
                }
                Err(e) => {
                    report(&e);
                    let unreachable = e.is_unreachable();
                    self.status.metrics().upload_failure(unreachable);
                    tracing::warn!(error = %e, "upload failed; will retry (writes go on locally)");
                    let now = chrono::Utc::now();
                    let since = *outage_since.get_or_insert(now);
                    self.forget_manifest();
                    self.status.update(|s| {
                        s.upload_state = if unreachable { "unreachable" } else { "error" }.into();
                        s.last_error = Some(e.to_string());
                        s.last_outage = Some(crate::status::Outage {
                            from: since.to_rfc3339(),
                            to: None,
                        });
                    });
                    self.refresh_backlog();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(15));
                }
            }
        }
    }

    /// After a failed round: the manifest is read again before the next
    /// decision (it may have moved meanwhile). Public so that a test driving
    /// rounds step by step reacts to a failure exactly as [`Uploader::run`].
    pub fn forget_manifest(&mut self) {
        self.manifest = None;
    }

    fn refresh_backlog(&self) {
        let Ok(heads) = self.journal.heads() else {
            return;
        };
        for h in heads {
            let backlog = self.journal.backlog(&h.name).map(|b| b.0).unwrap_or(0);
            self.status.update(|s| {
                let d = s.databases.entry(h.name.clone()).or_default();
                d.head_txid = h.head_txid;
                d.uploaded_txid = h.uploaded_txid;
                d.backlog = backlog;
            });
        }
    }

    /// Publish everything the journal holds beyond the manifest. Only a
    /// primary publishes (or one finishing its work before a hand-over).
    pub async fn round(&mut self) -> Result<()> {
        if !self.node.role().publishes() {
            self.drop_files();
            return Ok(());
        }
        // Commits the kernel served and the tailer has not read yet.
        self.node.capture().catch_up();
        for head in self.journal.heads()? {
            self.publish_db(head).await?;
        }
        self.publish_files().await?;
        self.refresh_backlog();
        let every = self
            .policy
            .retention
            .clamp(Duration::from_secs(1), Duration::from_secs(600));
        let due = self.last_prune.is_none_or(|t| t.elapsed() > every);
        if due {
            self.prune().await?;
            self.last_prune = Some(Instant::now());
        }
        Ok(())
    }

    async fn current(&mut self) -> Result<Versioned> {
        if let Some(v) = &self.manifest {
            return Ok(v.clone());
        }
        let loaded = manifest::load(self.store.as_ref(), &self.layout, &self.canonical_id).await?;
        let v = match loaded {
            Some(v) => v,
            None => {
                let m = Manifest::new(
                    &self.canonical_id,
                    &self.node_id,
                    self.epoch.load(Ordering::Relaxed),
                );
                let etag = manifest::swap(self.store.as_ref(), &self.layout, None, &m).await;
                match etag {
                    Ok(etag) => Versioned { manifest: m, etag },
                    // Someone created it first: use theirs.
                    Err(StoreError::PreconditionFailed { .. }) => {
                        manifest::load(self.store.as_ref(), &self.layout, &self.canonical_id)
                            .await?
                            .ok_or_else(|| UploadError::Conflict("manifest vanished".into()))?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        self.manifest = Some(v.clone());
        Ok(v)
    }

    /// The lease came to this node at `epoch`. Writes may resume only if every
    /// database the bucket knows continues this node's own history; then the
    /// manifest's epoch moves to `epoch`, so a deposed primary's next
    /// compare-and-swap fails. A lost race on that swap means the manifest
    /// changed after it was judged (the old primary's last upload, say): the
    /// whole decision is taken again from the manifest as it now is.
    pub async fn take_over(&mut self, epoch: u64) -> Result<()> {
        self.files_reconciled = false;
        let start = Instant::now();
        let res = self.take_over_once(epoch).await;
        if res.is_ok() {
            tracing::info!(
                epoch,
                ms = start.elapsed().as_millis() as u64,
                "take-over done (manifest read, view settled, head adopted, epoch swapped)"
            );
        }
        res
    }

    async fn take_over_once(&mut self, epoch: u64) -> Result<()> {
        for _ in 0..5 {
            self.manifest = None;
            let v = self.current().await?;
            if v.manifest.epoch > epoch {
                return Err(UploadError::EpochBehind(NotYet::EpochBehind {
                    manifest: v.manifest.epoch,
                    lease: epoch,
                }));
            }
            let starts = self.take_over_starts(&v).await?;
            if v.manifest.epoch == epoch && v.manifest.epochs.iter().any(|x| x.epoch == epoch) {
                return self.took_over(epoch); // bumped already (an earlier try's lost answer)
            }
            let mut next = v.manifest.clone();
            next.epoch = epoch;
            next.epochs.retain(|x| x.epoch != epoch);
            next.epochs.push(EpochStart {
                epoch,
                start_txid: starts,
            });
            next.updated_at = chrono::Utc::now().to_rfc3339();
            next.updated_by = self.node_id.clone();
            match manifest::swap(self.store.as_ref(), &self.layout, Some(&v.etag), &next).await {
                Ok(etag) => {
                    self.manifest = Some(Versioned {
                        manifest: next,
                        etag,
                    });
                    return self.took_over(epoch);
                }
                Err(StoreError::PreconditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(UploadError::Conflict(
            "manifest kept changing under us while taking over".into(),
        ))
    }

    fn took_over(&self, epoch: u64) -> Result<()> {
        self.journal.note_epoch(epoch)?;
        tracing::info!(epoch, "manifest epoch advanced; this node is the primary");
        Ok(())
    }

    /// Where the new epoch starts for each database, if every database in `v`
    /// continues this node's history (a secondary's copy at the bucket's head
    /// is adopted first); a conflict saying why not otherwise.
    async fn take_over_starts(
        &mut self,
        v: &Versioned,
    ) -> Result<std::collections::BTreeMap<String, u64>> {
        let mut starts = std::collections::BTreeMap::new();
        for (db, d) in &v.manifest.databases {
            // The follower says it has not applied the head yet: settling
            // and hashing now would be wasted (and slow it down); it was
            // asked to look now and this is tried again shortly.
            let applied = self.node.views().get(db).map(|v| v.applied_txid);
            let journaled = self.journal.head(db)?;
            let parent = self.journal.parent(db)?;
            // A new local generation on top of exactly the bucket's head is
            // ahead of it, not behind (the follower leaves it alone).
            let behind = applied.is_some_and(|a| a < d.head_txid)
                && journaled.as_ref().is_none_or(|j| {
                    (j.generation != d.generation || j.head_txid < d.head_txid)
                        && !super::divergent::on_top(j, parent, d)
                })
                && self.node.all_local();
            if behind {
                return Err(UploadError::Conflict(format!(
                    "{db}: applied txid {} of the bucket's {}: it must catch up before taking writes",
                    applied.unwrap_or(0),
                    d.head_txid
                )));
            }
            // The view's WAL is SQLite's own on a secondary: fold it into the
            // main file first, so the file is the head and capture starts on
            // an empty WAL (docs/ARCHITECTURE.md, "Promotion").
            let node = self.node.clone();
            let name = db.clone();
            let t = Instant::now();
            let settled = tokio::task::spawn_blocking(move || {
                let settled = node.settle_view(&name)?;
                if settled {
                    node.capture().forget_wal(&name);
                }
                Ok::<bool, String>(settled)
            })
            .await
            .map_err(|e| UploadError::Conflict(e.to_string()))?
            .map_err(|e| UploadError::Conflict(format!("{db}: settling the view: {e}")))?;
            if settled {
                tracing::info!(db, ms = t.elapsed().as_millis() as u64, "view settled");
            }
            let mut local = self.journal.head(db)?;
            let own_unconfirmed = local.as_ref().is_some_and(|j| {
                j.generation == d.generation
                    && j.uploaded_txid < d.head_txid
                    && d.head_txid < j.head_txid
            });
            if own_unconfirmed {
                // The bucket's head is within this node's unpublished
                // history: its own upload whose answer was lost (before a
                // restart, say) if the checksums agree. Then it is published,
                // and the rest continues it; otherwise this node would wait
                // in catching-up for ever.
                let own = self.journal.txns(db, d.head_txid - 1, d.head_txid, 0)?;
                if own.first().map(|x| x.post_checksum) == manifest::parse_hex64(&d.head_checksum) {
                    self.journal.mark_uploaded(db, d.head_txid)?;
                    local = self.journal.head(db)?;
                }
            }
            let parent = self.journal.parent(db)?;
            // A history whose tail was set aside as divergent cannot go on:
            // the bucket's history went another way.
            let continues = |j: &DbHead, aside: bool| {
                if aside {
                    return false;
                }
                let same = j.generation == d.generation
                    && ((j.head_txid == d.head_txid
                        && Some(j.head_checksum) == manifest::parse_hex64(&d.head_checksum))
                        || (j.head_txid > d.head_txid && j.uploaded_txid == d.head_txid));
                // This node restarted history from its own database (changed
                // outside membridge) on top of exactly the bucket's head.
                let newer = super::divergent::on_top(j, parent, d);
                same || newer
            };
            let aside = self.journal.divergent_through(db)?.is_some();
            let ours = local.as_ref().is_some_and(|j| continues(j, aside));
            if !ours && !self.node.all_local() {
                return Err(UploadError::Conflict(format!(
                    "{db}: still hydrating from the bucket; taking writes once it is local"
                )));
            }
            if !ours {
                // A secondary being promoted: its follower's copy, if it is
                // exactly the bucket's head, becomes the start of its history.
                let node = self.node.clone();
                let (name, d2) = (db.clone(), d.clone());
                let t = Instant::now();
                let adopted = tokio::task::spawn_blocking(move || node.capture().adopt(&name, &d2))
                    .await
                    .map_err(|e| UploadError::Conflict(e.to_string()))?
                    .map_err(|e| UploadError::Conflict(e.to_string()))?;
                if adopted {
                    tracing::info!(db, ms = t.elapsed().as_millis() as u64, "head adopted");
                    local = self.journal.head(db)?;
                }
            }
            let aside = self.journal.divergent_through(db)?.is_some();
            let ours = local.as_ref().is_some_and(|j| continues(j, aside));
            if !ours {
                return Err(UploadError::Conflict(format!(
                    "{db}: the bucket is at txid {} (generation {}), this node at {}; \
                     it must catch up from the bucket before taking writes",
                    d.head_txid,
                    d.generation,
                    local
                        .map(|j| format!(
                            "{} (generation {}, base {})",
                            j.head_txid, j.generation, j.base_txid
                        ))
                        .unwrap_or_else(|| "nothing".into())
                )));
            }
            starts.insert(db.clone(), local.map_or(d.head_txid, |j| j.head_txid) + 1);
        }
        for h in self.journal.heads()? {
            if !v.manifest.databases.contains_key(&h.name) {
                // The bucket has no history of it to diverge from.
                self.journal.clear_divergent(&h.name)?;
            }
            starts.entry(h.name.clone()).or_insert(h.head_txid + 1);
        }
        Ok(starts)
    }

    async fn advance(
        &mut self,
        db: &str,
        expect_head: Option<u64>,
        f: impl Fn(&mut Manifest),
    ) -> Result<()> {
        self.advance_with(Some((db, expect_head)), f).await
    }

    /// Advance the manifest with `f`, retrying on a lost race as long as the
    /// database's head in the bucket is still the one we build on. A manifest
    /// at a newer epoch means another node took over: this one is fenced.
    async fn advance_with(
        &mut self,
        expect: Option<(&str, Option<u64>)>,
        f: impl Fn(&mut Manifest),
    ) -> Result<()> {
        let db = expect.map(|(db, _)| db).unwrap_or("manifest");
        for _ in 0..5 {
            let v = self.current().await?;
            let ours = self.epoch.load(Ordering::Acquire);
            if v.manifest.epoch > ours {
                return Err(UploadError::Fenced(format!(
                    "the manifest moved to epoch {}, this node wrote under epoch {ours}",
                    v.manifest.epoch
                )));
            }
            let expect_head = expect.and_then(|(_, h)| h);
            let found = v.manifest.databases.get(db).map(|d| d.head_txid);
            if expect_head.is_some() && found != expect_head {
                return Err(UploadError::Conflict(format!(
                    "{db}: the manifest's head is {found:?}, this node built on {expect_head:?} (another writer?)"
                )));
            }
            let mut next = v.manifest.clone();
            f(&mut next);
            next.updated_at = chrono::Utc::now().to_rfc3339();
            next.updated_by = self.node_id.clone();
            match manifest::swap(self.store.as_ref(), &self.layout, Some(&v.etag), &next).await {
                Ok(etag) => {
                    self.manifest = Some(Versioned {
                        manifest: next,
                        etag,
                    });
                    return Ok(());
                }
                Err(StoreError::PreconditionFailed { .. }) => self.manifest = None,
                Err(e) => return Err(e.into()),
            }
        }
        Err(UploadError::Conflict(format!(
            "{db}: manifest kept changing under us"
        )))
    }

    async fn publish_db(&mut self, h: DbHead) -> Result<()> {
        if h.page_size == 0 || self.journal.divergent_through(&h.name)?.is_some() {
            return Ok(()); // nothing yet, or a history set aside: never uploaded
        }
        let v = self.current().await?;
        let in_bucket = v.manifest.databases.get(&h.name).cloned();
        // A generation starts with its base snapshot.
        let started = in_bucket
            .as_ref()
            .is_some_and(|d| d.generation == h.generation && d.head_txid >= h.base_txid);
        if !started {
            self.publish_snapshot(&h, h.base_txid, None).await?;
        }
        let mut uploaded = self
            .journal
            .head(&h.name)?
            .map(|x| x.uploaded_txid.max(h.base_txid))
            .unwrap_or(h.base_txid);
        if let Some(d) = self
            .manifest
            .as_ref()
            .and_then(|v| v.manifest.databases.get(&h.name))
            .cloned()
        {
            let t = d.head_txid.min(h.head_txid);
            if t > uploaded && d.generation == h.generation && t == d.head_txid {
                // The bucket's head is this node's own transaction whose
                // publication was never confirmed (a lost answer, or a crash
                // right after the manifest moved): it is published. Without
                // this the journal counts it as backlog for ever.
                let own = self.journal.txns(&h.name, t - 1, t, 0)?;
                if own.first().map(|x| x.post_checksum) == manifest::parse_hex64(&d.head_checksum) {
                    self.journal.mark_uploaded(&h.name, t)?;
                }
            }
            uploaded = uploaded.max(t);
        }
        while uploaded < h.head_txid {
            let txns =
                self.journal
                    .txns(&h.name, uploaded, h.head_txid, self.policy.segment_bytes)?;
            let (Some(first), Some(last)) = (txns.first(), txns.last()) else {
                break;
            };
            let (from, to, post, size) = (
                first.txid,
                last.txid,
                last.post_checksum,
                last.db_size_pages,
            );
            let meta = SegmentMeta {
                db_name: h.name.clone(),
                node_id: self.node_id.clone(),
                page_size: h.page_size,
                created_ms: now_ms(),
            };
            let body = Bytes::from(codec::encode_segment(&meta, &txns)?);
            let key = self.layout.segment(&h.name, from, to);
            let bytes = body.len();
            match self
                .store
                .put(&key, body.clone(), PutMode::CreateOnly)
                .await
            {
                Ok(_) => self
                    .status
                    .metrics()
                    .uploaded(&h.name, Object::Segment, bytes as u64),
                Err(StoreError::PreconditionFailed { .. }) => {
                    self.check_existing(&key, post, &h.name, from, body).await?
                }
                Err(e) => return Err(e.into()),
            }
            let gen = h.generation;
            let ps = h.page_size;
            let name = h.name.clone();
            self.advance(&h.name, Some(from - 1), |m| {
                if let Some(d) = m.databases.get_mut(&name) {
                    d.head_txid = to;
                    d.head_checksum = hex64(post);
                    d.size_pages = size;
                    d.page_size = ps;
                    d.generation = gen;
                }
            })
            .await?;
            self.journal.mark_uploaded(&h.name, to)?;
            uploaded = to;
            tracing::debug!(db = %h.name, from, to, bytes, "segment published");
            self.status.update(|s| {
                let d = s.databases.entry(h.name.clone()).or_default();
                d.uploaded_txid = to;
                d.last_upload = Some(chrono::Utc::now().to_rfc3339());
                d.last_error = None;
            });
        }
        let since = self.journal.since_base(&h.name)?;
        if since.0 >= self.policy.snapshot_txns || since.1 >= self.policy.snapshot_bytes {
            self.snapshot_now(&h.name).await?;
        }
        Ok(())
    }

    /// Replicated files, after the databases of the same round: a marker must
    /// not reach a secondary before the database state it describes. The first
    /// round as primary reconciles with the bucket first.
    async fn publish_files(&mut self) -> Result<()> {
        let node = self.node.clone();
        let recorder = node.capture().files();
        if !self.files_reconciled {
            self.manifest = None; // the latest, not what this node last wrote
            let v = self.current().await?;
            let backing = node.capture().backing_dir();
            super::files::reconcile(
                self.store.as_ref(),
                &v.manifest,
                &backing,
                recorder,
                node.invalidator(),
            )
            .await?;
            self.files_reconciled = true;
        }
        let pending = recorder.take();
        if pending.is_empty() {
            return Ok(());
        }
        let res = self.put_files(&pending).await;
        if res.is_err() {
            recorder.put_back(pending);
        }
        res
    }

    async fn put_files(
        &mut self,
        pending: &std::collections::BTreeMap<String, super::files::Version>,
    ) -> Result<()> {
        let v = self.current().await?;
        let changes = super::files::changes(&self.layout, &v.manifest, pending);
        if changes.is_empty() {
            return Ok(());
        }
        for (_, c) in &changes {
            let Some((e, body)) = c else { continue };
            match self
                .store
                .put(&e.key, body.clone(), PutMode::CreateOnly)
                .await
            {
                // The key is the content's hash: taken means already there.
                Ok(_) | Err(StoreError::PreconditionFailed { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.advance_with(None, |m| super::files::apply(m, &changes))
            .await?;
        for (name, c) in &changes {
            match c {
                Some((e, _)) => {
                    tracing::info!(file = %name, sha256 = %e.sha256, size = e.size, "replicated file published")
                }
                None => tracing::info!(file = %name, "replicated file's deletion published"),
            }
        }
        Ok(())
    }

    /// No longer primary: versions not published by now are not this node's
    /// to publish any more (the bucket's win; see `super::files`).
    fn drop_files(&mut self) {
        self.files_reconciled = false;
        let dropped = self.node.capture().files().take();
        if !dropped.is_empty() {
            tracing::warn!(
                files = ?dropped.keys().collect::<Vec<_>>(),
                "no longer primary: unpublished versions of replicated files dropped"
            );
        }
    }

    /// A create-only put found the key taken: fine if it is our own earlier
    /// upload (a crash between the put and the manifest); replaced if it is
    /// a deposed primary's (see below); a conflict otherwise.
    async fn check_existing(
        &self,
        key: &str,
        post: u64,
        db: &str,
        from: u64,
        body: Bytes,
    ) -> Result<()> {
        let got = self.store.get(key).await?;
        let h = codec::parse_segment_header(&got.body)?;
        let ours = self.epoch.load(Ordering::Acquire);
        let owner = self
            .manifest
            .as_ref()
            .and_then(|v| v.manifest.epoch_of(db, from));
        if h.post_checksum == post {
            Ok(())
        } else if h.epoch < ours && owner == Some(ours) {
            // A deposed primary wrote these txids before its manifest
            // compare-and-swap failed: the manifest gives them to this
            // epoch, so no reader takes that segment, and it would block
            // this primary's publication for ever (keys are txid ranges).
            tracing::warn!(
                key,
                node = %h.node_id,
                epoch = h.epoch,
                "replacing a deposed primary's unpublished segment"
            );
            self.store.put(key, body, PutMode::Overwrite).await?;
            Ok(())
        } else if h.epoch > ours {
            Err(UploadError::Fenced(format!(
                "{key} was written under epoch {} by {}, a newer primary",
                h.epoch, h.node_id
            )))
        } else {
            Err(UploadError::Conflict(format!(
                "{key} already holds other transactions (written by node {}, epoch {}): another primary?",
                h.node_id, h.epoch
            )))
        }
    }

    /// `membridge push`: publish the backlog, then a snapshot of every database.
    pub async fn push(&mut self) -> Result<String> {
        let role = self.node.role();
        if !role.publishes() {
            return Err(UploadError::Refused(format!(
                "this node is {} — only the primary publishes",
                role.name()
            )));
        }
        self.manifest = None;
        self.round().await?;
        let mut done = Vec::new();
        for h in self.journal.heads()? {
            if h.page_size == 0 {
                continue;
            }
            self.snapshot_now(&h.name).await?;
            let txid = self
                .journal
                .head(&h.name)?
                .map(|x| x.base_txid)
                .unwrap_or(0);
            done.push(format!("{} at txid {txid}", h.name));
        }
        self.refresh_backlog();
        Ok(if done.is_empty() {
            "nothing to publish: no replicated database yet".into()
        } else {
            format!("published snapshot of {}", done.join(", "))
        })
    }

    /// Take a snapshot at the head of what is uploaded: advance the base image
    /// with journaled transactions, then publish it.
    pub async fn snapshot_now(&mut self, db: &str) -> Result<()> {
        let Some(h) = self.journal.head(db)? else {
            return Ok(());
        };
        let target = h.uploaded_txid;
        if target > h.base_txid {
            let (journal, base_dir, name) =
                (self.journal.clone(), self.base_dir.clone(), db.to_string());
            let h2 = h.clone();
            tokio::task::spawn_blocking(move || advance_base(&journal, &base_dir, &h2, target))
                .await
                .map_err(|e| UploadError::Conflict(format!("{name}: base builder: {e}")))??;
        }
        let h = self.journal.head(db)?.expect("head exists");
        self.publish_snapshot(&h, h.base_txid, Some(h.base_txid))
            .await
    }

    /// Upload the base image at `txid` as a snapshot and point the manifest at it.
    /// `on_head`: the manifest head it must already be at (None: a generation start).
    async fn publish_snapshot(
        &mut self,
        h: &DbHead,
        txid: u64,
        on_head: Option<u64>,
    ) -> Result<()> {
        let path = base_path(&self.base_dir, &h.name, txid);
        let io = |source| UploadError::Io {
            db: h.name.clone(),
            source,
        };
        // Hashing and compressing a large image takes seconds: off the
        // runtime's workers, which also renew the lease. Both stream from the
        // file, and the object goes to a file the upload reads as it sends:
        // memory does not grow with the database.
        let (db_name, node_id) = (h.name.clone(), self.node_id.clone());
        let (epoch, page_size) = (self.epoch.load(Ordering::Relaxed), h.page_size);
        let image_path = path.clone();
        let body = TempFile(path.with_extension("snapshot.tmp"));
        let body_path = body.0.clone();
        let (hashes, bytes) = tokio::task::spawn_blocking(move || -> Result<_> {
            let hashes = PageHashes::from_file(&image_path, page_size).map_err(|source| {
                UploadError::Io {
                    db: db_name.clone(),
                    source,
                }
            })?;
            let meta = SnapshotMeta {
                db_name,
                node_id,
                txid,
                epoch,
                page_size,
                page_count: hashes.page_count(),
                db_checksum: hashes.checksum(),
                timestamp_ms: now_ms(),
            };
            let len = codec::encode_snapshot_file(meta, &image_path, &body_path)?;
            Ok((hashes, len))
        })
        .await
        .map_err(|e| io(std::io::Error::other(e.to_string())))??;
        let key = self.layout.snapshot(&h.name, txid);
        let put = self
            .store
            .put_file(&key, &body.0, PutMode::CreateOnly)
            .await;
        drop(body);
        match put {
            Ok(_) => self
                .status
                .metrics()
                .uploaded(&h.name, Object::Snapshot, bytes),
            Err(StoreError::PreconditionFailed { .. }) => {
                let got = self.store.get_range(&key, 0, 4096).await?;
                let found = codec::SnapshotReader::parse_header(&got)?;
                if found.db_checksum != hashes.checksum() {
                    return Err(UploadError::Conflict(format!(
                        "{key} already holds another image (node {})",
                        found.node_id
                    )));
                }
            }
            Err(e) => return Err(e.into()),
        }
        let snap = SnapshotRef {
            txid,
            key: key.clone(),
            checksum: hex64(hashes.checksum()),
            size_pages: hashes.page_count(),
            taken_at: chrono::Utc::now().to_rfc3339(),
        };
        let (name, gen, ps) = (h.name.clone(), h.generation, h.page_size);
        let checksum = hashes.checksum();
        let size = hashes.page_count();
        self.advance(&h.name, on_head, move |m| {
            let d = m
                .databases
                .entry(name.clone())
                .or_insert_with(|| DbManifest {
                    generation: gen,
                    head_txid: txid,
                    head_checksum: hex64(checksum),
                    page_size: ps,
                    size_pages: size,
                    snapshot: None,
                    older_snapshots: Vec::new(),
                });
            if on_head.is_none() {
                // A new generation: history restarts at this image.
                d.generation = gen;
                d.head_txid = txid;
                d.head_checksum = hex64(checksum);
                d.page_size = ps;
                d.size_pages = size;
            }
            if let Some(old) = d.snapshot.replace(snap.clone()) {
                if old.txid != snap.txid {
                    d.older_snapshots.push(old);
                }
            }
        })
        .await?;
        if on_head.is_none() {
            self.journal.mark_uploaded(&h.name, txid)?;
        }
        tracing::info!(db = %h.name, txid, key = %key, "snapshot published");
        self.status.update(|s| {
            let d = s.databases.entry(h.name.clone()).or_default();
            d.uploaded_txid = d.uploaded_txid.max(txid);
            d.last_upload = Some(chrono::Utc::now().to_rfc3339());
        });
        if h.name == super::legacy::LEGACY_DB {
            // Nodes still on the old tool pull this; a failure here must not
            // stop replication, so it is logged, not returned.
            if let Err(e) = super::legacy::publish(
                self.store.as_ref(),
                &self.layout,
                &self.project_id,
                &self.canonical_id,
                &self.node_id,
                &path,
                Some(txid),
            )
            .await
            {
                tracing::warn!(error = %e, "legacy snapshot not published");
            }
        }
        Ok(())
    }

    /// Delete snapshots and segments older than the retention period, keeping
    /// the newest snapshot older than the cut-off so restore still reaches it.
    async fn prune(&mut self) -> Result<()> {
        let Some(v) = self.manifest.clone() else {
            return Ok(());
        };
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(self.policy.retention)
                .unwrap_or(chrono::Duration::days(7));
        let mut changed = Vec::new();
        for (db, d) in &v.manifest.databases {
            let keep_from = d
                .older_snapshots
                .iter()
                .chain(d.snapshot.iter())
                .filter(|s| {
                    chrono::DateTime::parse_from_rfc3339(&s.taken_at)
                        .is_ok_and(|t| t.with_timezone(&chrono::Utc) <= cutoff)
                })
                .map(|s| s.txid)
                .max();
            let Some(keep_from) = keep_from else {
                continue;
            };
            for o in self.store.list(&self.layout.snapshot_prefix(db)).await? {
                if let Some(k) = self.layout.parse_snapshot(&o.key) {
                    if k.txid < keep_from {
                        self.store.delete(&o.key).await?;
                    }
                }
            }
            for o in self.store.list(&self.layout.segment_prefix(db)).await? {
                if let Some(k) = self.layout.parse_segment(&o.key) {
                    if k.to <= keep_from {
                        self.store.delete(&o.key).await?;
                    }
                }
            }
            changed.push((db.clone(), keep_from));
        }
        if !changed.is_empty() {
            for (db, keep_from) in changed {
                let head = v.manifest.databases.get(&db).map(|d| d.head_txid);
                self.advance(&db, head, |m| {
                    if let Some(d) = m.databases.get_mut(&db) {
                        d.older_snapshots.retain(|s| s.txid >= keep_from);
                    }
                })
                .await?;
            }
        }
        Ok(())
    }
}

/// A file removed when dropped: a snapshot body lives only as long as its upload.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Advance the base image to `to` and drop the journal's covered transactions.
fn advance_base(journal: &Journal, base_dir: &Path, h: &DbHead, to: u64) -> Result<()> {
    let to_path = base_path(base_dir, &h.name, to);
    materialize(journal, base_dir, h, to, &to_path).map_err(|e| match e {
        BaseError::Journal(j) => UploadError::Journal(j),
        other => UploadError::Conflict(other.to_string()),
    })?;
    journal.set_base(&h.name, to)?;
    let old = base_path(base_dir, &h.name, h.base_txid);
    let _ = std::fs::remove_file(&old);
    // A snapshot body a crash left behind mid-upload.
    let _ = std::fs::remove_file(old.with_extension("snapshot.tmp"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Txn;
    use crate::remote::{Fault, FaultyStore, MemStore, Op, Rule};
    use crate::replica::capture::Capture;

    const DB: &str = "claude-mem.db";
    const PS: u32 = 4096;

    /// One node's uploader on a bucket, its journal holding a first generation
    /// of `DB` with `txns` transactions written under epoch 1.
    struct Fixture {
        _dir: tempfile::TempDir,
        journal: Arc<Journal>,
        epoch: Arc<AtomicU64>,
        up: Uploader,
    }

    fn fixture(store: Arc<dyn ObjectStore>, txns: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        std::fs::create_dir_all(&backing).unwrap();
        let base_dir = dir.path().join("base");
        std::fs::create_dir_all(&base_dir).unwrap();
        let journal = Arc::new(Journal::open(&dir.path().join("journal.db")).unwrap());
        std::fs::write(base_path(&base_dir, DB, 0), vec![0u8; PS as usize]).unwrap();
        journal
            .start_generation(&DbHead {
                name: DB.into(),
                page_size: PS,
                generation: 1,
                head_txid: 0,
                head_checksum: 0,
                size_pages: 1,
                uploaded_txid: 0,
                base_txid: 0,
            })
            .unwrap();
        for txid in 1..=txns {
            journal
                .append(
                    DB,
                    &Txn {
                        txid,
                        epoch: 1,
                        db_size_pages: 1,
                        pre_checksum: txid - 1,
                        post_checksum: txid,
                        timestamp_ms: 1,
                        pages: vec![(1, Bytes::from(vec![txid as u8; PS as usize]))],
                    },
                )
                .unwrap();
        }
        let epoch = Arc::new(AtomicU64::new(1));
        let status = Status::for_tests("b");
        let wake = Arc::new(Notify::new());
        let root = crate::replica::capture::open_root(&backing);
        let capture = Arc::new(Capture::new(
            root,
            journal.clone(),
            base_dir.clone(),
            epoch.clone(),
            wake.clone(),
            status.clone(),
        ));
        let node = Arc::new(Node::new(
            "b",
            capture,
            crate::replica::node::Role::Primary,
            status.clone(),
        ));
        let up = Uploader::new(
            store,
            Layout::new("test"),
            "p".into(),
            "test".into(),
            "b".into(),
            journal.clone(),
            base_dir,
            epoch.clone(),
            wake,
            status,
            Policy::default(),
            node,
        );
        Fixture {
            _dir: dir,
            journal,
            epoch,
            up,
        }
    }

    async fn manifest_of(store: &dyn ObjectStore) -> Manifest {
        manifest::load(store, &Layout::new("test"), "test")
            .await
            .unwrap()
            .unwrap()
            .manifest
    }

    /// Rewrites the manifest behind the uploader's back, once, just before its
    /// next manifest CAS: `change` is what the other writer does.
    fn race_next_manifest_cas(
        faulty: &FaultyStore,
        mem: Arc<MemStore>,
        change: fn(&mut Manifest),
    ) -> crate::remote::faults::RuleHandle {
        faulty.inject(
            Rule::new(
                Op::Put,
                "*manifest.json",
                Fault::before(move |_| {
                    let mem = mem.clone();
                    async move {
                        let layout = Layout::new("test");
                        let v = manifest::load(mem.as_ref(), &layout, "test")
                            .await
                            .unwrap()
                            .unwrap();
                        let mut next = v.manifest.clone();
                        change(&mut next);
                        manifest::swap(mem.as_ref(), &layout, Some(&v.etag), &next)
                            .await
                            .unwrap();
                    }
                }),
            )
            .times(1),
        )
    }

    /// Issue 11, item 3: the old primary's last upload advances the head
    /// between take_over's read and its epoch-bump CAS. The retry must decide
    /// again from the manifest as it now is (this node is behind: catch up
    /// first), not re-apply the first decision: that left a manifest whose
    /// head was beyond the new epoch's start_txid, so followers rejected the
    /// old epoch's segments and the new primary's publishes failed forever.
    #[tokio::test]
    async fn take_over_decides_again_after_a_lost_epoch_bump_race() {
        let mem = Arc::new(MemStore::new("bucket"));
        let faulty = Arc::new(FaultyStore::new(mem.clone()));
        let mut f = fixture(faulty.clone(), 3);
        f.up.round().await.unwrap();
        assert_eq!(manifest_of(mem.as_ref()).await.databases[DB].head_txid, 3);

        let raced = race_next_manifest_cas(&faulty, mem.clone(), |m| {
            // The deposed primary publishes txid 4 under epoch 1.
            let d = m.databases.get_mut(DB).unwrap();
            d.head_txid = 4;
            d.head_checksum = hex64(0xdead);
            m.updated_by = "a".into();
        });
        f.epoch.store(2, Ordering::Release);
        let res = f.up.take_over(2).await;
        assert_eq!(raced.fired(), 1);
        let m = manifest_of(mem.as_ref()).await;
        let err = res.expect_err("this node is behind the bucket: it must catch up first");
        assert!(err.to_string().contains("catch up"), "{err}");
        assert_eq!(m.epoch, 1, "the epoch must not move on a stale decision");
        assert!(m.epochs.iter().all(|e| e.epoch != 2), "{:?}", m.epochs);
        assert_eq!(m.databases[DB].head_txid, 4);
    }

    /// Issue 12: a snapshot never sits whole in memory. The object goes up
    /// through a streamed put from a file (a whole-buffer put does not fire the
    /// rule), for an image several times the codec's and the upload's buffers,
    /// and it holds the bytes the in-memory encoder makes of the image.
    #[tokio::test]
    async fn a_snapshot_is_uploaded_from_a_file_not_a_buffer() {
        let mem = Arc::new(MemStore::new("bucket"));
        let faulty = Arc::new(FaultyStore::new(mem.clone()));
        let f = fixture(faulty.clone(), 0);
        // 4 MiB that zstd cannot shrink (xorshift), so the object is as large.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let image: Vec<u8> = (0..4 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let base_dir = f.up.base_dir.clone();
        std::fs::write(base_path(&base_dir, DB, 0), &image).unwrap();
        let tmp = base_path(&base_dir, DB, 0).with_extension("snapshot.tmp");
        let streamed = faulty.inject(Rule::new(
            Op::PutFile,
            "*/snap/*",
            Fault::before(move |_| {
                let len = std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
                assert!(
                    len > 4 << 20,
                    "the body is a file of the whole object ({len} bytes)"
                );
                async {}
            }),
        ));
        let mut up = f.up;
        up.round().await.unwrap();
        assert_eq!(
            streamed.fired(),
            1,
            "the snapshot was not streamed from a file"
        );
        let key = Layout::new("test").snapshot(DB, 0);
        let got = mem.body(&key).expect("snapshot uploaded");
        let (header, decoded) = codec::decode_snapshot(&got).unwrap();
        assert_eq!(decoded, image);
        let meta = SnapshotMeta {
            db_name: DB.into(),
            node_id: header.node_id.clone(),
            txid: 0,
            epoch: header.epoch,
            page_size: PS,
            page_count: header.page_count,
            db_checksum: header.db_checksum,
            timestamp_ms: header.timestamp_ms,
        };
        assert!(
            got == codec::encode_snapshot(meta, &image).unwrap(),
            "format changed"
        );
        let left: Vec<_> = std::fs::read_dir(&base_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "the body file is removed: {left:?}");
    }

    /// A concurrent change that leaves the head alone: the retry succeeds,
    /// and the new epoch starts right after the head it read again.
    #[tokio::test]
    async fn take_over_retries_a_lost_race_that_left_the_head_alone() {
        let mem = Arc::new(MemStore::new("bucket"));
        let faulty = Arc::new(FaultyStore::new(mem.clone()));
        let mut f = fixture(faulty.clone(), 3);
        f.up.round().await.unwrap();
        let raced = race_next_manifest_cas(&faulty, mem.clone(), |m| {
            m.updated_by = "someone-else".into();
        });
        f.epoch.store(2, Ordering::Release);
        f.up.take_over(2).await.unwrap();
        assert_eq!(raced.fired(), 1);
        let m = manifest_of(mem.as_ref()).await;
        assert_eq!(m.epoch, 2);
        let e2 = m.epochs.iter().find(|e| e.epoch == 2).unwrap();
        assert_eq!(e2.start_txid[DB], 4);
        assert_eq!(f.journal.last_epoch().unwrap(), 2);
    }
}
