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
use crate::remote::{Layout, ObjectStore, PutMode, StoreError};
use crate::sqlite::checksum::PageHashes;
use crate::status::Object;
use crate::status::Status;

/// Requests from the control socket (`membridge push`).
pub enum Command {
    /// Publish everything and take a snapshot now; the reply says what was
    /// done, or why not ([`UploadError::Refused`]: not in this role).
    Push(tokio::sync::oneshot::Sender<std::result::Result<String, UploadError>>),
    /// Publish the backlog now, without a snapshot (a hand-over: the next
    /// primary continues this history, it needs no new starting point).
    Flush(tokio::sync::oneshot::Sender<std::result::Result<(), UploadError>>),
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
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// The bucket is at a newer epoch than the one this node wrote under.
    #[error("fenced: {0}")]
    Fenced(String),
    #[error(transparent)]
    EpochBehind(NotYet),
    /// Not this node's job in its current role (exit code 3 on the CLI).
    #[error("{0}")]
    Refused(String),
}

/// How the bucket, or this node's own state, disagrees with what an upload or
/// a take-over needs: retrying as is will not help ([`Outcome::Conflict`]).
#[derive(Debug, thiserror::Error)]
pub enum Conflict {
    /// Every compare-and-swap of the manifest in a take-over lost its race.
    #[error("manifest kept changing under us while taking over")]
    TakeOverRaced,
    /// Every compare-and-swap of the manifest for `db` lost its race.
    #[error("{db}: manifest kept changing under us")]
    ManifestRaced { db: String },
    /// The manifest was there when its creation failed, then gone.
    #[error("manifest vanished")]
    ManifestVanished,
    /// The manifest's head of `db` is not the one this node built on.
    #[error(
        "{db}: the manifest's head is {found:?}, this node built on {expected:?} (another writer?)"
    )]
    HeadMoved {
        db: String,
        found: Option<u64>,
        expected: Option<u64>,
    },
    /// A segment's key already holds other transactions, of this epoch or
    /// an older one.
    #[error("{key} already holds other transactions (written by node {node}, epoch {epoch}): another primary?")]
    SegmentTaken {
        key: String,
        node: String,
        epoch: u64,
    },
    /// A snapshot's key already holds another image.
    #[error("{key} already holds another image (node {node})")]
    SnapshotTaken { key: String, node: String },
    /// Taking over: the local copy of `db` is behind the bucket's head.
    #[error("{db}: applied txid {applied} of the bucket's {head}: it must catch up before taking writes")]
    Behind { db: String, applied: u64, head: u64 },
    /// Taking over: `db` is still being hydrated from the bucket.
    #[error("{db}: still hydrating from the bucket; taking writes once it is local")]
    Hydrating { db: String },
    /// Taking over: `db`'s history here does not continue the bucket's;
    /// `local` describes this node's head.
    #[error("{db}: the bucket is at txid {head} (generation {generation}), this node at {local}; it must catch up from the bucket before taking writes")]
    NotOurs {
        db: String,
        head: u64,
        generation: u64,
        local: String,
    },
    /// Taking over: folding the secondary's view of `db` into its file failed.
    #[error("{db}: settling the view: {why}")]
    SettleView { db: String, why: String },
    /// Taking over: adopting the follower's copy of the bucket's head failed.
    #[error(transparent)]
    Adopt(#[from] crate::replica::capture::CaptureError),
    /// The base image could not be advanced to the wanted txid.
    #[error(transparent)]
    Base(BaseError),
    /// A blocking task of the uploader panicked or was cancelled.
    #[error("{what}: {source}")]
    Task {
        what: String,
        source: tokio::task::JoinError,
    },
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

/// What the uploader needs from the configuration.
#[derive(Debug, Clone)]
pub struct UploadSettings {
    pub project_id: String,
    pub canonical_id: String,
    pub node_id: String,
    pub policy: Policy,
}

/// What the uploader shares with the node's other parts.
pub struct UploadShared {
    /// What capture journals, and the uploader publishes.
    pub journal: Arc<Journal>,
    /// The base images: the last snapshot of each database, advanced.
    pub base_dir: PathBuf,
    /// The epoch this node writes under (the roles module sets it).
    pub epoch: Arc<AtomicU64>,
    /// Notified by capture at every commit.
    pub wake: Arc<Notify>,
    pub status: Status,
    /// The node's role decides whether a round publishes.
    pub node: Arc<Node>,
}

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
    pub fn new(s: UploadSettings, store: Arc<dyn ObjectStore>, shared: UploadShared) -> Uploader {
        Uploader {
            store,
            layout: Layout::new(&s.canonical_id),
            project_id: s.project_id,
            canonical_id: s.canonical_id,
            node_id: s.node_id,
            journal: shared.journal,
            base_dir: shared.base_dir,
            epoch: shared.epoch,
            wake: shared.wake,
            status: shared.status,
            policy: s.policy,
            node: shared.node,
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
                        let res = self.push().await.inspect_err(|e| {
                            if !matches!(e, UploadError::Refused(_)) {
                                report(e);
                                self.status.metrics().upload_failure(e.is_unreachable());
                            }
                        });
                        let _ = reply.send(res);
                    }
                    Command::Flush(reply) => {
                        self.manifest = None;
                        let res = self.round().await.inspect_err(&report);
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
            self.status
                .journaled(&h.name, h.head_txid, h.uploaded_txid, backlog);
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
                            .ok_or(Conflict::ManifestVanished)?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        self.manifest = Some(v.clone());
        Ok(v)
    }
}

mod publish;
mod snapshot;
mod takeover;
#[cfg(test)]
mod tests;
