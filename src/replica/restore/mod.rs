//! `membridge restore`: rebuild one replicated database, as it was at a txid or
//! a time within retention, from the bucket alone (docs/RESTORE.md, docs/FORMAT.md).
//!
//! 1. Read `manifest.json`: the head (txid, checksum, size) bounds what is
//!    published; the epoch history says which epoch owns which txids.
//! 2. Pick the newest snapshot at or before the target among those the
//!    manifest names *and* those listed under `db/<name>/snap/`, so older
//!    snapshots within retention serve even when the manifest names only the
//!    newest.
//! 3. Plan the segments from the snapshot to the target by their keys, and
//!    settle forks (several segments starting at the same txid: a deposed
//!    primary's tail) by epoch, then by checksum continuity up to the head.
//! 4. Stream the snapshot into a temporary file next to FILE (fixed memory:
//!    one download chunk plus one frame), verifying every frame, the
//!    whole-database checksum and the whole-file CRC.
//! 5. Apply the segments' transactions in txid order up to the target,
//!    resizing to each transaction's `db_size_pages`, checking each
//!    transaction's pre- and post-checksum against the running checksum kept
//!    with [`PageHashes`].
//! 6. Re-hash the file, fsync, and move it to FILE atomically (never a partial
//!    FILE, never a silent overwrite).
//!
//! Every rejection names the object key and the reason.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::progress::Progress;
use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};

use super::manifest::{self, parse_hex64, DbManifest, Manifest, ManifestError, SnapshotRef};
use super::verify::{Chain, VerifyError};
use crate::journal::codec::{
    self, CodecError, SegmentHeader, SegmentReader, SnapshotHeader, SnapshotReader,
    SEGMENT_MAX_HEADER_LEN, SNAPSHOT_MAX_HEADER_LEN,
};
use crate::remote::{Layout, ObjectStore, StoreError};
use crate::sqlite::checksum::PageHashes;
use crate::sqlite::header::is_valid_page_size;

/// Snapshots are downloaded in range reads of this size, so memory stays at
/// one chunk plus one frame whatever the database size.
const CHUNK: u64 = 8 << 20;

/// What state to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The manifest's head.
    Latest,
    /// The state right after this transaction.
    Txid(u64),
    /// The state after the last transaction committed at or before this time
    /// (the longest prefix of the history whose commit timestamps are all
    /// `<=` it).
    Time(DateTime<Utc>),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Latest => write!(f, "latest"),
            Target::Txid(t) => write!(f, "txid {t}"),
            Target::Time(t) => write!(f, "time {}", t.to_rfc3339()),
        }
    }
}

/// Knobs of [`restore_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Show progress: a bar when stderr is a terminal, else an `info` log
    /// line per 10% on long work (see [`crate::progress`]).
    pub progress: bool,
    /// Replace an existing FILE (and remove its `-wal`, `-shm`, `-journal`,
    /// which SQLite would otherwise apply over the restored content).
    pub force: bool,
}

/// What was restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// The restored state is the database right after this txid.
    pub txid: u64,
    /// Whole-database checksum of the restored file (docs/FORMAT.md §2).
    pub checksum: u64,
    pub size_pages: u32,
    pub page_size: u32,
    pub snapshot_key: String,
    pub segments_applied: usize,
    /// Transactions applied on top of the snapshot.
    pub txns_applied: u64,
    pub bytes_downloaded: u64,
    /// Commit time (Unix ms) of `txid` when a segment supplied it; `None` when
    /// the result is the snapshot itself.
    pub commit_ms: Option<i64>,
}

impl RestoreReport {
    pub fn commit_time(&self) -> Option<DateTime<Utc>> {
        self.commit_ms
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
    }
}

/// Why a restore failed. Every message is one line and names the object (or
/// file) and the reason.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{key}: no manifest: nothing has been published for this project (wrong CLAUDE_PROJECT_ID or bucket?)")]
    NoManifest { key: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{key}: malformed manifest: {why}")]
    MalformedManifest { key: String, why: String },
    #[error("{key}: no database {db:?} in the manifest (it has: {known})")]
    UnknownDb {
        key: String,
        db: String,
        known: String,
    },
    #[error("{target} is after the head of {db} (txid {head}): nothing newer has been published")]
    AfterHead {
        target: Target,
        db: String,
        head: u64,
    },
    #[error("{target} is in the future: the head of {db} is txid {head}")]
    InFuture {
        target: Target,
        db: String,
        head: u64,
    },
    #[error("{target} is before the earliest available snapshot of {db} ({earliest}): older history is not in the bucket")]
    BeforeSnapshots {
        target: Target,
        db: String,
        earliest: String,
    },
    #[error("no snapshot of {db} in the bucket: the manifest names none and {prefix} is empty")]
    NoSnapshot { db: String, prefix: String },
    #[error("{key}: missing snapshot: the manifest names it but the bucket does not have it")]
    MissingSnapshot { key: String },
    #[error("{key}: {} {what}: {source}", classify(.source))]
    Corrupt {
        key: String,
        /// "segment" or "snapshot".
        what: &'static str,
        source: CodecError,
    },
    #[error("{key}: {why}")]
    Mismatch { key: String, why: String },
    #[error("txid chain gap: segment {key} starts at txid {from} but the chain is at {at}{}", gap_detail(*.from, *.at))]
    ChainGap { key: String, from: u64, at: u64 },
    #[error("txid chain gap: no segment under {prefix} starts at txid {} (the chain is at {at}, the target needs txids up to {goal})", .at + 1)]
    ChainEnds { prefix: String, at: u64, goal: u64 },
    #[error("{key}: checksum chain mismatch at txid {txid}: the segment continues from {found:016x}, but the database after txid {} is {expected:016x}", .txid.saturating_sub(1))]
    ChecksumChain {
        key: String,
        txid: u64,
        expected: u64,
        found: u64,
    },
    #[error("{key}: txid {txid}: after applying it the database checksum is {computed:016x}, the segment says {stored:016x}")]
    PostChecksum {
        key: String,
        txid: u64,
        stored: u64,
        computed: u64,
    },
    #[error("{key}: the manifest's head is txid {txid} with checksum {expected} and {pages} pages, the restored database has {computed:016x} and {computed_pages} pages")]
    HeadMismatch {
        key: String,
        txid: u64,
        expected: String,
        pages: u32,
        computed: u64,
        computed_pages: u32,
    },
    #[error("segment {key} was written in epoch {epoch}, but the manifest gives txid {txid} to epoch {owner} (a deposed primary's tail)")]
    ForeignEpoch {
        key: String,
        epoch: u64,
        txid: u64,
        owner: u64,
    },
    #[error("cannot tell which segment continues the chain at txid {at}: none of {keys} leads to the manifest's head (txid {head}, checksum {head_checksum:016x})")]
    NoPathToHead {
        at: u64,
        keys: String,
        head: u64,
        head_checksum: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite it (use --force)")]
    Exists { path: String },
    #[error(
        "{path} exists: SQLite would apply it over the restored database; remove it or use --force"
    )]
    StaleSidecar { path: String },
}

/// How a codec rejection reads in a sentence.
/// The shared checks' errors, as restore has always named them.
impl From<VerifyError> for RestoreError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::Gap { key, from, at } => RestoreError::ChainGap { key, from, at },
            VerifyError::ForeignEpoch {
                key,
                epoch,
                txid,
                owner,
            } => RestoreError::ForeignEpoch {
                key,
                epoch,
                txid,
                owner,
            },
            VerifyError::ChecksumChain {
                key,
                txid,
                expected,
                found,
            } => RestoreError::ChecksumChain {
                key,
                txid,
                expected,
                found,
            },
            VerifyError::PostChecksum {
                key,
                txid,
                stored,
                computed,
            } => RestoreError::PostChecksum {
                key,
                txid,
                stored,
                computed,
            },
        }
    }
}

fn classify(e: &CodecError) -> &'static str {
    match e {
        CodecError::Truncated { .. } => "truncated",
        CodecError::LengthMismatch { expected, actual }
        | CodecError::FrameLength {
            expected, actual, ..
        } if actual < expected => "truncated",
        CodecError::LengthMismatch { .. } | CodecError::FrameLength { .. } => "oversized",
        CodecError::Checksum { .. } | CodecError::DbChecksum { .. } => "corrupt",
        _ => "invalid",
    }
}

fn gap_detail(from: u64, at: u64) -> String {
    if from > at + 1 {
        if from == at + 2 {
            format!(" (txid {} is missing)", at + 1)
        } else {
            format!(" (txids {}..={} are missing)", at + 1, from - 1)
        }
    } else {
        " (it overlaps transactions already applied)".to_string()
    }
}

fn io_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> RestoreError + 'a {
    move |source| RestoreError::Io {
        path: path.display().to_string(),
        op,
        source,
    }
}

/// Runs file and CPU work off the async executor (any runtime flavour). If
/// the future is dropped meanwhile, the task's [`Output`] removes the
/// temporary file when it ends.
async fn blocking<T, F>(f: F) -> Result<T, RestoreError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => Ok(v),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(RestoreError::Io {
            path: "restore".into(),
            op: "background task",
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// Restores `db` as of `target` into the new file `out` (refuses to replace
/// an existing one; see [`restore_with`]).
pub async fn restore(
    store: &dyn ObjectStore,
    layout: &Layout,
    canonical_id: &str,
    db: &str,
    target: Target,
    out: &Path,
    progress: bool,
) -> Result<RestoreReport, RestoreError> {
    let opts = RestoreOptions {
        progress,
        force: false,
    };
    restore_with(store, layout, canonical_id, db, target, out, opts).await
}

/// [`restore`] with all options.
pub async fn restore_with(
    store: &dyn ObjectStore,
    layout: &Layout,
    canonical_id: &str,
    db: &str,
    target: Target,
    out: &Path,
    opts: RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    preflight(out, opts.force)?;
    let (m, mkey) = load_manifest(store, layout, canonical_id, db).await?;
    let d = &m.databases[db];
    let head = Head::from_manifest(&mkey, db, d)?;

    // The target as a txid bound (and a time bound for Time).
    let (goal, time_ms) = match target {
        Target::Latest => (head.txid, None),
        Target::Txid(t) if t > head.txid => {
            return Err(RestoreError::AfterHead {
                target,
                db: db.to_string(),
                head: head.txid,
            })
        }
        Target::Txid(t) => (t, None),
        Target::Time(t) if t > Utc::now() => {
            return Err(RestoreError::InFuture {
                target,
                db: db.to_string(),
                head: head.txid,
            })
        }
        Target::Time(t) => (head.txid, Some(t.timestamp_millis())),
    };

    let ctx = Ctx {
        store,
        layout,
        manifest: &m,
        manifest_key: &mkey,
        db,
        head: &head,
    };
    let mut downloaded = 0u64;
    let snap = ctx
        .choose_snapshot(target, goal, time_ms, d, &mut downloaded)
        .await?;
    // For a time target the end of the chain is not known in advance: a
    // defect after the target time must not prevent restoring before it.
    let (segments, beyond) = ctx
        .plan_segments(
            snap.header.txid,
            snap.header.db_checksum,
            goal,
            time_ms.is_some(),
            &mut downloaded,
        )
        .await?;

    let total = snap.size + segments.iter().map(|s| s.size).sum::<u64>();
    let bar = Progress::new(opts.progress, total, format!("restoring {db}"));

    let mut output = Output::create(out, head.page_size)?;
    output = ctx
        .stream_snapshot(&snap, output, &bar, &mut downloaded)
        .await?;

    // Apply segments up to the goal (or the time).
    let mut at = snap.header.txid;
    let mut applied_segments = 0usize;
    let mut txns_applied = 0u64;
    let mut commit_ms = None;
    let mut time_reached = false;
    for seg in &segments {
        if at >= goal {
            break;
        }
        let body = ctx.get_object(&seg.key, &mut downloaded).await?;
        bar.inc(body.len() as u64);
        let job = SegmentJob {
            key: seg.key.clone(),
            db: db.to_string(),
            page_size: head.page_size,
            key_from: seg.from,
            key_to: seg.to,
            at,
            epoch_owner: m.epoch_of(db, seg.to),
            goal,
            time_ms,
        };
        let (out_back, res) = blocking(move || {
            let mut output = output;
            let r = job.apply(&mut output, &body);
            (output, r)
        })
        .await?;
        output = out_back;
        let done = res?;
        if done.applied > 0 {
            applied_segments += 1;
            txns_applied += done.applied;
            at = done.last_txid;
            commit_ms = Some(done.last_ms);
        }
        if done.time_reached {
            time_reached = true;
            break;
        }
    }
    bar.finish();
    if let (false, Some(e)) = (time_reached, beyond) {
        return Err(e);
    }

    if time_ms.is_none() && at != goal {
        // The plan covered the goal; only a segment ending early gets here.
        return Err(RestoreError::ChainEnds {
            prefix: layout.segment_prefix(db),
            at,
            goal,
        });
    }
    let checksum = output.hashes.checksum();
    let size_pages = output.hashes.page_count();
    if at == head.txid && (checksum != head.checksum || size_pages != head.size_pages) {
        return Err(RestoreError::HeadMismatch {
            key: mkey.clone(),
            txid: head.txid,
            expected: manifest::hex64(head.checksum),
            pages: head.size_pages,
            computed: checksum,
            computed_pages: size_pages,
        });
    }
    let force = opts.force;
    let out_path = out.to_path_buf();
    blocking(move || output.commit(&out_path, force)).await??;

    Ok(RestoreReport {
        txid: at,
        checksum,
        size_pages,
        page_size: head.page_size,
        snapshot_key: snap.key,
        segments_applied: applied_segments,
        txns_applied,
        bytes_downloaded: downloaded,
        commit_ms,
    })
}

/// The manifest, which must know `db`, and its key.
async fn load_manifest(
    store: &dyn ObjectStore,
    layout: &Layout,
    canonical_id: &str,
    db: &str,
) -> Result<(Manifest, String), RestoreError> {
    let mkey = layout.manifest();
    let m = manifest::load(store, layout, canonical_id)
        .await?
        .ok_or_else(|| RestoreError::NoManifest { key: mkey.clone() })?
        .manifest;
    if !m.databases.contains_key(db) {
        return Err(RestoreError::UnknownDb {
            key: mkey.clone(),
            db: db.to_string(),
            known: if m.databases.is_empty() {
                "none".into()
            } else {
                m.databases.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        });
    }
    Ok((m, mkey))
}

/// What a secondary needs to serve a database before it is local: the
/// latest snapshot, read frame by frame on demand, and the pages the
/// transactions after it changed (their last images), at the head.
pub struct LazyStart {
    pub snapshot_key: String,
    pub reader: SnapshotReader,
    /// Last image of every page changed after the snapshot, within the head's size.
    pub overlay: std::collections::BTreeMap<u32, Bytes>,
    pub txid: u64,
    pub generation: u64,
    pub checksum: u64,
    pub size_pages: u32,
    pub page_size: u32,
    pub commit_ms: Option<i64>,
    pub bytes_downloaded: u64,
}

/// Plans the head of `db` as snapshot + later transactions, downloading only
/// the snapshot's header and index and the segments after it. The segment
/// chain is verified by its checksums (pre of each transaction = post of the
/// one before, ending on the manifest's head); the page-level verification
/// is left to whoever assembles the pages (the hydrator hashes the file
/// once it is whole).
pub async fn open_lazy(
    store: &dyn ObjectStore,
    layout: &Layout,
    canonical_id: &str,
    db: &str,
) -> Result<LazyStart, RestoreError> {
    let (m, mkey) = load_manifest(store, layout, canonical_id, db).await?;
    let d = &m.databases[db];
    let head = Head::from_manifest(&mkey, db, d)?;
    let ctx = Ctx {
        store,
        layout,
        manifest: &m,
        manifest_key: &mkey,
        db,
        head: &head,
    };
    let mut downloaded = 0u64;
    let snap = ctx
        .choose_snapshot(Target::Latest, head.txid, None, d, &mut downloaded)
        .await?;
    let corrupt = |source| RestoreError::Corrupt {
        key: snap.key.clone(),
        what: "snapshot",
        source,
    };
    let suffix_len = snap.header.index_suffix_len().min(snap.size);
    let suffix = ctx
        .get_range(
            &snap.key,
            snap.size - suffix_len,
            suffix_len,
            &mut downloaded,
        )
        .await?;
    let reader = SnapshotReader::new(snap.header.clone(), &suffix).map_err(corrupt)?;
    if reader.object_len() != snap.size {
        return Err(corrupt(CodecError::LengthMismatch {
            expected: reader.object_len(),
            actual: snap.size,
        }));
    }
    let (segments, _) = ctx
        .plan_segments(
            snap.header.txid,
            snap.header.db_checksum,
            head.txid,
            false,
            &mut downloaded,
        )
        .await?;
    // Lazily served: pages are hashed when hydration ends (module verify).
    let mut chain = Chain::new(snap.header.txid, snap.header.db_checksum);
    let mut size = snap.header.page_count;
    let mut overlay = std::collections::BTreeMap::new();
    let mut commit_ms = None;
    for seg in &segments {
        let body = ctx.get_object(&seg.key, &mut downloaded).await?;
        let bad = |source| RestoreError::Corrupt {
            key: seg.key.clone(),
            what: "segment",
            source,
        };
        let decoded = codec::decode_segment(&body).map_err(bad)?;
        check_segment_key(seg, &decoded.header, db, head.page_size)?;
        for t in decoded.txns {
            if t.txid <= chain.at {
                continue; // already in the snapshot this segment is entered from
            }
            let owner = m.epoch_of(db, t.txid);
            chain.apply(&seg.key, &t, owner, |_| Ok::<_, RestoreError>(None))?;
            size = t.db_size_pages;
            overlay.retain(|p, _| *p <= size);
            overlay.extend(t.pages);
            commit_ms = Some(t.timestamp_ms);
            if chain.at == head.txid {
                break;
            }
        }
    }
    let (at, running) = (chain.at, chain.running);
    if at != head.txid || running != head.checksum || size != head.size_pages {
        return Err(RestoreError::HeadMismatch {
            key: mkey,
            txid: head.txid,
            expected: manifest::hex64(head.checksum),
            pages: head.size_pages,
            computed: running,
            computed_pages: size,
        });
    }
    Ok(LazyStart {
        snapshot_key: snap.key,
        reader,
        overlay,
        txid: at,
        generation: d.generation,
        checksum: running,
        size_pages: size,
        page_size: head.page_size,
        commit_ms: commit_ms.or(Some(snap.header.timestamp_ms)),
        bytes_downloaded: downloaded,
    })
}

/// Fails early, before downloading anything, when FILE cannot be written.
fn preflight(out: &Path, force: bool) -> Result<(), RestoreError> {
    let dir = parent_dir(out);
    let md = std::fs::metadata(&dir).map_err(io_err(&dir, "directory of the output file"))?;
    if !md.is_dir() {
        return Err(RestoreError::Io {
            path: dir.display().to_string(),
            op: "directory of the output file",
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    if out.file_name().is_none() {
        return Err(RestoreError::Io {
            path: out.display().to_string(),
            op: "output file",
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        });
    }
    if let Ok(md) = std::fs::symlink_metadata(out) {
        if md.is_dir() {
            return Err(RestoreError::Io {
                path: out.display().to_string(),
                op: "output file",
                source: std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
            });
        }
        if !force {
            return Err(RestoreError::Exists {
                path: out.display().to_string(),
            });
        }
    }
    if !force {
        for s in sidecars(out) {
            if std::fs::symlink_metadata(&s).is_ok() {
                return Err(RestoreError::StaleSidecar {
                    path: s.display().to_string(),
                });
            }
        }
    }
    Ok(())
}

fn parent_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The files SQLite keeps next to a database and would read with it.
fn sidecars(out: &Path) -> Vec<PathBuf> {
    ["-wal", "-shm", "-journal"]
        .iter()
        .map(|suffix| {
            let mut s = out.as_os_str().to_os_string();
            s.push(suffix);
            PathBuf::from(s)
        })
        .collect()
}

mod output;
mod plan;
#[cfg(test)]
mod tests;

use output::*;
use plan::*;
