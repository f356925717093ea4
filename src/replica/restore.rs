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

/// The manifest's head of one database, parsed.
struct Head {
    txid: u64,
    checksum: u64,
    page_size: u32,
    size_pages: u32,
}

impl Head {
    fn from_manifest(key: &str, db: &str, d: &DbManifest) -> Result<Head, RestoreError> {
        let bad = |why: String| RestoreError::MalformedManifest {
            key: key.to_string(),
            why: format!("database {db:?}: {why}"),
        };
        let checksum = parse_hex64(&d.head_checksum)
            .ok_or_else(|| bad(format!("head_checksum {:?} is not hex", d.head_checksum)))?;
        if !is_valid_page_size(d.page_size) {
            return Err(bad(format!(
                "page_size {} is not a valid page size",
                d.page_size
            )));
        }
        for s in d.snapshot.iter().chain(&d.older_snapshots) {
            if parse_hex64(&s.checksum).is_none() {
                return Err(bad(format!(
                    "snapshot {} checksum {:?} is not hex",
                    s.key, s.checksum
                )));
            }
            if s.txid > d.head_txid {
                return Err(bad(format!(
                    "snapshot {} at txid {} is past the head {}",
                    s.key, s.txid, d.head_txid
                )));
            }
        }
        Ok(Head {
            txid: d.head_txid,
            checksum,
            page_size: d.page_size,
            size_pages: d.size_pages,
        })
    }
}

/// A snapshot picked for the restore, header verified.
struct ChosenSnapshot {
    key: String,
    size: u64,
    header: SnapshotHeader,
    /// The header bytes already downloaded (the start of the object).
    prefix: Bytes,
}

/// A segment on the planned chain, by its key.
#[derive(Debug, Clone)]
struct SegInfo {
    key: String,
    from: u64,
    to: u64,
    size: u64,
}

struct Ctx<'a> {
    store: &'a dyn ObjectStore,
    layout: &'a Layout,
    manifest: &'a Manifest,
    manifest_key: &'a str,
    db: &'a str,
    head: &'a Head,
}

impl Ctx<'_> {
    async fn get_object(&self, key: &str, downloaded: &mut u64) -> Result<Bytes, RestoreError> {
        let got = self.store.get(key).await?;
        *downloaded += got.body.len() as u64;
        Ok(got.body)
    }

    async fn get_range(
        &self,
        key: &str,
        start: u64,
        len: u64,
        downloaded: &mut u64,
    ) -> Result<Bytes, RestoreError> {
        let got = self.store.get_range(key, start, len).await?;
        *downloaded += got.len() as u64;
        Ok(got)
    }

    /// Accepts a segment or snapshot of `epoch` covering `txid` when the epoch
    /// history gives that txid to that epoch (or says nothing about it).
    fn epoch_owner(&self, txid: u64) -> Option<u64> {
        self.manifest.epoch_of(self.db, txid)
    }

    /// The newest usable snapshot at or before the target.
    async fn choose_snapshot(
        &self,
        target: Target,
        goal: u64,
        time_ms: Option<i64>,
        d: &DbManifest,
        downloaded: &mut u64,
    ) -> Result<ChosenSnapshot, RestoreError> {
        // Candidates: listed objects plus those the manifest names.
        struct Cand {
            txid: u64,
            key: String,
            size: Option<u64>,
            named: Option<SnapshotRef>,
        }
        let prefix = self.layout.snapshot_prefix(self.db);
        let mut cands: Vec<Cand> = Vec::new();
        for o in self.store.list(&prefix).await? {
            if let Some(k) = self.layout.parse_snapshot(&o.key) {
                if k.db == self.db {
                    cands.push(Cand {
                        txid: k.txid,
                        key: o.key,
                        size: Some(o.size),
                        named: None,
                    });
                }
            }
        }
        for r in d.snapshot.iter().chain(&d.older_snapshots) {
            match self.layout.parse_snapshot(&r.key) {
                Some(k) if k.db == self.db && k.txid == r.txid => {}
                _ => {
                    return Err(RestoreError::MalformedManifest {
                        key: self.manifest_key.to_string(),
                        why: format!(
                            "snapshot key {} is not the snapshot of {} at txid {}",
                            r.key, self.db, r.txid
                        ),
                    })
                }
            }
            match cands.iter_mut().find(|c| c.key == r.key) {
                Some(c) => c.named = Some(r.clone()),
                None => cands.push(Cand {
                    txid: r.txid,
                    key: r.key.clone(),
                    size: None,
                    named: Some(r.clone()),
                }),
            }
        }
        if cands.is_empty() {
            return Err(RestoreError::NoSnapshot {
                db: self.db.to_string(),
                prefix,
            });
        }
        // Above the head: a crashed upload or a fenced primary; never published.
        cands.retain(|c| c.txid <= self.head.txid);
        if cands.is_empty() {
            return Err(RestoreError::NoSnapshot {
                db: self.db.to_string(),
                prefix,
            });
        }
        cands.sort_by_key(|c| std::cmp::Reverse(c.txid));
        // The oldest snapshot looked at, for the "before" error.
        let mut oldest_seen: Option<(u64, String, i64)> = None;
        for c in &cands {
            if c.txid > goal {
                continue;
            }
            let Some(size) = c.size else {
                return Err(RestoreError::MissingSnapshot { key: c.key.clone() });
            };
            let want = size.min(SNAPSHOT_MAX_HEADER_LEN as u64);
            let prefix_bytes = self.get_range(&c.key, 0, want, downloaded).await?;
            let corrupt = |source| RestoreError::Corrupt {
                key: c.key.clone(),
                what: "snapshot",
                source,
            };
            let h = SnapshotReader::parse_header(&prefix_bytes).map_err(corrupt)?;
            oldest_seen = Some((c.txid, c.key.clone(), h.timestamp_ms));
            let mismatch = |why: String| RestoreError::Mismatch {
                key: c.key.clone(),
                why,
            };
            if h.db_name != self.db {
                return Err(mismatch(format!(
                    "snapshot of database {:?}, expected {:?}",
                    h.db_name, self.db
                )));
            }
            if h.txid != c.txid {
                return Err(mismatch(format!(
                    "snapshot header says txid {}, its key says {}",
                    h.txid, c.txid
                )));
            }
            if h.page_size != self.head.page_size {
                return Err(mismatch(format!(
                    "snapshot page size {} differs from the manifest's {}",
                    h.page_size, self.head.page_size
                )));
            }
            if let Some(r) = &c.named {
                let named = parse_hex64(&r.checksum).unwrap_or_default();
                if named != h.db_checksum || r.size_pages != h.page_count {
                    return Err(mismatch(format!(
                        "snapshot holds checksum {:016x} and {} pages, the manifest says {} and {}",
                        h.db_checksum, h.page_count, r.checksum, r.size_pages
                    )));
                }
            }
            // A snapshot older than the epoch that owns its txid comes from a
            // deposed primary: not the published history.
            if let Some(owner) = self.epoch_owner(h.txid) {
                if c.named.is_none() && h.epoch < owner {
                    continue;
                }
            }
            if let Some(t) = time_ms {
                if h.timestamp_ms > t {
                    continue;
                }
            }
            return Ok(ChosenSnapshot {
                key: c.key.clone(),
                size,
                header: h,
                prefix: prefix_bytes,
            });
        }
        let oldest = cands.last().expect("not empty");
        let earliest = match oldest_seen {
            Some((txid, key, ms)) if txid == oldest.txid => {
                let at = Utc
                    .timestamp_millis_opt(ms)
                    .single()
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| ms.to_string());
                format!("txid {txid}, taken at {at}, {key}")
            }
            _ => format!("txid {}, {}", oldest.txid, oldest.key),
        };
        Err(RestoreError::BeforeSnapshots {
            target,
            db: self.db.to_string(),
            earliest,
        })
    }

    /// The segments that carry the chain from `start` (checksum `start_ck`)
    /// to `goal`, in order. Keys decide where they are unambiguous (each
    /// segment is verified when applied); where several segments start at the
    /// same txid, their headers decide: the epoch history first, then the
    /// checksum continuing the chain, then which one leads to the head.
    ///
    /// With `tolerant`, a break in the chain ends the plan instead of failing
    /// it, and comes back as the second value.
    async fn plan_segments(
        &self,
        start: u64,
        start_ck: u64,
        goal: u64,
        tolerant: bool,
        downloaded: &mut u64,
    ) -> Result<(Vec<SegInfo>, Option<RestoreError>), RestoreError> {
        if start >= goal {
            return Ok((Vec::new(), None));
        }
        let prefix = self.layout.segment_prefix(self.db);
        let mut all: Vec<SegInfo> = Vec::new();
        for o in self.store.list(&prefix).await? {
            if let Some(k) = self.layout.parse_segment(&o.key) {
                // Past the head: never published (a crashed upload, a
                // deposed primary's tail).
                if k.db == self.db && k.to <= self.head.txid {
                    all.push(SegInfo {
                        key: o.key,
                        from: k.from,
                        to: k.to,
                        size: o.size,
                    });
                }
            }
        }
        all.sort_by_key(|s| (s.from, s.to));
        let mut headers = HeaderCache::default();
        let mut path: Vec<SegInfo> = Vec::new();
        let mut at = start;
        let mut ck = Some(start_ck);
        while at < goal {
            let mut cands: Vec<&SegInfo> = all.iter().filter(|s| s.from == at + 1).collect();
            let mut entering = false;
            if cands.is_empty() {
                // A snapshot need not fall on a segment boundary: enter a
                // segment that holds the next txid and skip what it has before.
                cands = all.iter().filter(|s| s.from <= at && s.to > at).collect();
                entering = true;
            }
            let step = match cands.len() {
                0 => Err(self.gap_error(&all, at, goal, &prefix)),
                1 => {
                    ck = None;
                    Ok(cands[0].clone())
                }
                _ if entering => {
                    ck = None;
                    self.settle_entry(&all, &cands, at, &mut headers, downloaded)
                        .await
                }
                _ => {
                    let here = match ck {
                        Some(c) => Ok(c),
                        None => {
                            let last = path.last().expect("a segment brought the chain here");
                            headers
                                .get(self, last, downloaded)
                                .await
                                .map(|h| h.post_checksum)
                        }
                    };
                    match here {
                        Ok(here) => {
                            self.settle_fork(&all, &cands, at, here, &mut headers, downloaded)
                                .await
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            let chosen = match step {
                Ok(c) => c,
                Err(e) if tolerant => return Ok((path, Some(e))),
                Err(e) => return Err(e),
            };
            if cands.len() > 1 && !entering {
                ck = Some(headers.get(self, &chosen, downloaded).await?.post_checksum);
            }
            at = chosen.to;
            path.push(chosen);
        }
        Ok((path, None))
    }

    fn gap_error(&self, all: &[SegInfo], at: u64, goal: u64, prefix: &str) -> RestoreError {
        // The segment that would come next (the first one beyond the chain)
        // names the gap best.
        let next = all
            .iter()
            .filter(|s| s.from > at + 1)
            .min_by_key(|s| s.from);
        match next {
            Some(s) => RestoreError::ChainGap {
                key: s.key.clone(),
                from: s.from,
                at,
            },
            _ => RestoreError::ChainEnds {
                prefix: prefix.to_string(),
                at,
                goal,
            },
        }
    }

    /// Whether segment `s` (header `h`) can continue a chain at `at` with
    /// checksum `here`: the shared check (module verify). `here` is not
    /// looked at when `s` starts before `at + 1` (entered part-way).
    fn enters(
        &self,
        s: &SegInfo,
        h: &SegmentHeader,
        at: u64,
        here: u64,
    ) -> Result<(), VerifyError> {
        Chain::new(at, here).enters(
            &s.key,
            (s.from, s.to),
            h.epoch,
            h.pre_checksum,
            self.epoch_owner(h.txid_to),
        )
    }

    async fn settle_fork(
        &self,
        all: &[SegInfo],
        cands: &[&SegInfo],
        at: u64,
        here: u64,
        headers: &mut HeaderCache,
        downloaded: &mut u64,
    ) -> Result<SegInfo, RestoreError> {
        let mut viable: Vec<(SegInfo, SegmentHeader)> = Vec::new();
        let mut first_err: Option<RestoreError> = None;
        for c in cands {
            let h = match headers.get(self, c, downloaded).await {
                Ok(h) => h,
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            if let Err(e) = self.enters(c, &h, at, here) {
                first_err.get_or_insert(e.into());
                continue;
            }
            viable.push(((*c).clone(), h));
        }
        match viable.len() {
            0 => Err(first_err.expect("every candidate was rejected for a reason")),
            1 => Ok(viable.remove(0).0),
            _ => {
                // Both continue the same state (a fork): the published one
                // is the one whose chain reaches the head's checksum. Prefer
                // the highest epoch among those that do.
                viable.sort_by_key(|v| std::cmp::Reverse(v.1.epoch));
                for (s, h) in &viable {
                    if self.reaches_head(all, s, h, headers, downloaded).await? {
                        return Ok(s.clone());
                    }
                }
                Err(RestoreError::NoPathToHead {
                    at,
                    keys: viable
                        .iter()
                        .map(|(s, _)| s.key.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    head: self.head.txid,
                    head_checksum: self.head.checksum,
                })
            }
        }
    }

    /// Several segments hold the txid after a snapshot that falls inside
    /// them (overlapping batches): their headers cannot show the checksum at
    /// the entry point, so keep those of the right epoch that lead to the head.
    async fn settle_entry(
        &self,
        all: &[SegInfo],
        cands: &[&SegInfo],
        at: u64,
        headers: &mut HeaderCache,
        downloaded: &mut u64,
    ) -> Result<SegInfo, RestoreError> {
        let mut viable = Vec::new();
        for c in cands {
            if let Ok(h) = headers.get(self, c, downloaded).await {
                // Entered part-way: the epoch is what can be checked.
                if self.enters(c, &h, at, 0).is_ok() {
                    viable.push(((*c).clone(), h));
                }
            }
        }
        viable.sort_by_key(|v| std::cmp::Reverse(v.1.epoch));
        for (s, h) in &viable {
            if self.reaches_head(all, s, h, headers, downloaded).await? {
                return Ok(s.clone());
            }
        }
        Err(RestoreError::NoPathToHead {
            at,
            keys: cands
                .iter()
                .map(|s| s.key.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            head: self.head.txid,
            head_checksum: self.head.checksum,
        })
    }

    /// Whether a chain of segment headers leads from `s` to the manifest's
    /// head txid and checksum.
    async fn reaches_head(
        &self,
        all: &[SegInfo],
        s: &SegInfo,
        h: &SegmentHeader,
        headers: &mut HeaderCache,
        downloaded: &mut u64,
    ) -> Result<bool, RestoreError> {
        let mut stack = vec![(s.clone(), h.clone())];
        let mut seen = std::collections::HashSet::new();
        while let Some((s, h)) = stack.pop() {
            if !seen.insert(s.key.clone()) {
                continue;
            }
            if s.to == self.head.txid {
                if h.post_checksum == self.head.checksum {
                    return Ok(true);
                }
                continue;
            }
            for n in all.iter().filter(|n| n.from == s.to + 1) {
                // A damaged header is simply not a way forward here.
                let Ok(nh) = headers.get(self, n, downloaded).await else {
                    continue;
                };
                if self.enters(n, &nh, s.to, h.post_checksum).is_ok() {
                    stack.push((n.clone(), nh));
                }
            }
        }
        Ok(false)
    }

    /// Downloads the snapshot in chunks and writes its image to `output`,
    /// verifying what [`SnapshotReader::restore_to`] verifies: header, index,
    /// object length, every frame, the whole-database checksum, the
    /// whole-file CRC.
    async fn stream_snapshot(
        &self,
        snap: &ChosenSnapshot,
        mut output: Output,
        bar: &Progress,
        downloaded: &mut u64,
    ) -> Result<Output, RestoreError> {
        let key = snap.key.as_str();
        let corrupt = |source| RestoreError::Corrupt {
            key: key.to_string(),
            what: "snapshot",
            source,
        };
        let h = snap.header.clone();
        let suffix_len = h.index_suffix_len();
        let min_len = u64::from(h.header_len) + suffix_len;
        if snap.size < min_len {
            return Err(corrupt(CodecError::Truncated {
                what: "snapshot",
                needed: min_len,
                available: snap.size,
            }));
        }
        let suffix = self
            .get_range(key, snap.size - suffix_len, suffix_len, downloaded)
            .await?;
        let reader = SnapshotReader::new(h.clone(), &suffix).map_err(corrupt)?;
        if reader.object_len() != snap.size {
            return Err(corrupt(CodecError::LengthMismatch {
                expected: reader.object_len(),
                actual: snap.size,
            }));
        }
        let mut sink = SnapshotSink {
            suffix,
            reader,
            next_frame: 0,
            buf: Vec::new(),
            buf_start: 0,
            crc: crc32fast::Hasher::new(),
            size: snap.size,
        };
        let mut pos = 0u64;
        let mut first = Some(snap.prefix.clone());
        while pos < snap.size {
            let want = (snap.size - pos).min(CHUNK);
            let chunk = match first.take() {
                // The header prefix is the object's start: reuse it.
                Some(p) if !p.is_empty() => p,
                _ => self.get_range(key, pos, want, downloaded).await?,
            };
            if chunk.is_empty() {
                return Err(corrupt(CodecError::Truncated {
                    what: "snapshot",
                    needed: snap.size,
                    available: pos,
                }));
            }
            pos += chunk.len() as u64;
            bar.inc(chunk.len() as u64);
            let (o, s, r) = blocking(move || {
                let mut output = output;
                let mut sink = sink;
                let r = sink.feed(&mut output, &chunk);
                (output, sink, r)
            })
            .await?;
            output = o;
            sink = s;
            r.map_err(|e| self.snapshot_error(key, e))?;
        }
        let (o, r) = blocking(move || {
            let r = sink.finish(&output);
            (output, r)
        })
        .await?;
        r.map_err(|e| self.snapshot_error(key, e))?;
        Ok(o)
    }

    fn snapshot_error(&self, key: &str, e: SinkError) -> RestoreError {
        match e {
            SinkError::Codec(source) => RestoreError::Corrupt {
                key: key.to_string(),
                what: "snapshot",
                source,
            },
            SinkError::Io(e) => e,
        }
    }
}

/// Segment headers fetched by range reads while settling forks.
#[derive(Default)]
struct HeaderCache {
    map: std::collections::HashMap<String, SegmentHeader>,
}

impl HeaderCache {
    async fn get(
        &mut self,
        ctx: &Ctx<'_>,
        s: &SegInfo,
        downloaded: &mut u64,
    ) -> Result<SegmentHeader, RestoreError> {
        if let Some(h) = self.map.get(&s.key) {
            return Ok(h.clone());
        }
        let want = s.size.min(SEGMENT_MAX_HEADER_LEN as u64);
        if want == 0 {
            return Err(RestoreError::Corrupt {
                key: s.key.clone(),
                what: "segment",
                source: CodecError::Truncated {
                    what: "segment header",
                    needed: 12,
                    available: 0,
                },
            });
        }
        let b = ctx.get_range(&s.key, 0, want, downloaded).await?;
        let h = codec::parse_segment_header(&b).map_err(|source| RestoreError::Corrupt {
            key: s.key.clone(),
            what: "segment",
            source,
        })?;
        check_segment_key(s, &h, ctx.db, ctx.head.page_size)?;
        self.map.insert(s.key.clone(), h.clone());
        Ok(h)
    }
}

/// A segment's header must agree with its key and with the database.
fn check_segment_key(
    s: &SegInfo,
    h: &SegmentHeader,
    db: &str,
    page_size: u32,
) -> Result<(), RestoreError> {
    let why = if h.db_name != db {
        format!("segment of database {:?}, expected {db:?}", h.db_name)
    } else if (h.txid_from, h.txid_to) != (s.from, s.to) {
        format!(
            "segment header says txids {}..={}, its key says {}..={}",
            h.txid_from, h.txid_to, s.from, s.to
        )
    } else if h.page_size != page_size {
        format!(
            "segment page size {} differs from the database's {page_size}",
            h.page_size
        )
    } else {
        return Ok(());
    };
    Err(RestoreError::Mismatch {
        key: s.key.clone(),
        why,
    })
}

/// The file being built: a temporary file next to FILE, removed on drop
/// unless committed, and the running page hashes of its content.
struct Output {
    tmp: PathBuf,
    file: File,
    hashes: PageHashes,
    page_size: u32,
    committed: bool,
}

impl Output {
    fn create(out: &Path, page_size: u32) -> Result<Output, RestoreError> {
        let dir = parent_dir(out);
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let hashes = PageHashes::new(page_size).map_err(|e| RestoreError::Mismatch {
            key: out.display().to_string(),
            why: e.to_string(),
        })?;
        let mut attempt = 0;
        loop {
            let tmp = dir.join(format!(
                ".{name}.restore-{}-{:08x}.tmp",
                std::process::id(),
                rand::random::<u32>()
            ));
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(file) => {
                    return Ok(Output {
                        tmp,
                        file,
                        hashes,
                        page_size,
                        committed: false,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => {
                    attempt += 1;
                }
                Err(e) => return Err(io_err(&tmp, "create temporary file")(e)),
            }
        }
    }

    fn ps(&self) -> u64 {
        u64::from(self.page_size)
    }

    /// Writes pages `first..` (consecutive) at the end of the image.
    fn append_pages(&mut self, first: u32, pages: &[Bytes]) -> Result<(), RestoreError> {
        if pages.is_empty() {
            return Ok(());
        }
        let last = first + pages.len() as u32 - 1;
        let mut off = u64::from(first - 1) * self.ps();
        for p in pages {
            self.file
                .write_all_at(p, off)
                .map_err(io_err(&self.tmp, "write"))?;
            off += p.len() as u64;
        }
        let it = pages
            .iter()
            .enumerate()
            .map(|(i, p)| (first + i as u32, &p[..]));
        self.hashes
            .apply(it, last)
            .map_err(|e| self.internal(e.to_string()))?;
        Ok(())
    }

    /// Applies one committed transaction: resize, then write its pages.
    fn apply_txn(&mut self, t: &codec::Txn) -> Result<u64, RestoreError> {
        self.file
            .set_len(u64::from(t.db_size_pages) * self.ps())
            .map_err(io_err(&self.tmp, "resize"))?;
        for (pgno, data) in &t.pages {
            self.file
                .write_all_at(data, u64::from(pgno - 1) * self.ps())
                .map_err(io_err(&self.tmp, "write"))?;
        }
        let it = t.pages.iter().map(|(p, d)| (*p, &d[..]));
        self.hashes
            .apply(it, t.db_size_pages)
            .map_err(|e| self.internal(e.to_string()))
    }

    fn internal(&self, why: String) -> RestoreError {
        RestoreError::Mismatch {
            key: self.tmp.display().to_string(),
            why,
        }
    }

    /// Re-hashes the file, fsyncs it and moves it to `out`.
    fn commit(mut self, out: &Path, force: bool) -> Result<(), RestoreError> {
        self.file.sync_all().map_err(io_err(&self.tmp, "fsync"))?;
        let on_disk = PageHashes::from_file(&self.tmp, self.page_size)
            .map_err(io_err(&self.tmp, "re-read"))?;
        if on_disk.checksum() != self.hashes.checksum()
            || on_disk.page_count() != self.hashes.page_count()
        {
            return Err(self.internal(format!(
                "the file reads back as checksum {:016x} ({} pages), {:016x} ({} pages) was written",
                on_disk.checksum(),
                on_disk.page_count(),
                self.hashes.checksum(),
                self.hashes.page_count()
            )));
        }
        if force {
            // Leftover sidecars of the file being replaced would be applied
            // over the restored content by the next SQLite that opens it.
            for s in sidecars(out) {
                match std::fs::remove_file(&s) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&s, "remove stale sidecar")(e)),
                }
            }
            std::fs::rename(&self.tmp, out).map_err(io_err(out, "rename into place"))?;
        } else {
            // link(2) fails if `out` appeared meanwhile: never a silent overwrite.
            match std::fs::hard_link(&self.tmp, out) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&self.tmp);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(RestoreError::Exists {
                        path: out.display().to_string(),
                    })
                }
                Err(_) if std::fs::symlink_metadata(out).is_ok() => {
                    return Err(RestoreError::Exists {
                        path: out.display().to_string(),
                    })
                }
                // A filesystem without hard links.
                Err(_) => {
                    std::fs::rename(&self.tmp, out).map_err(io_err(out, "rename into place"))?
                }
            }
        }
        self.committed = true;
        let dir = parent_dir(out);
        if let Ok(d) = File::open(&dir) {
            d.sync_all().map_err(io_err(&dir, "fsync directory"))?;
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

enum SinkError {
    Codec(CodecError),
    Io(RestoreError),
}

impl From<CodecError> for SinkError {
    fn from(e: CodecError) -> Self {
        SinkError::Codec(e)
    }
}

impl From<RestoreError> for SinkError {
    fn from(e: RestoreError) -> Self {
        SinkError::Io(e)
    }
}

/// Decodes a snapshot fed in order, chunk by chunk.
struct SnapshotSink {
    /// Index and footer as fetched first; the streamed tail must equal them,
    /// so the index used to decode is covered by the whole-file CRC.
    suffix: Bytes,
    reader: SnapshotReader,
    next_frame: u32,
    /// Bytes not consumed yet, starting at object offset `buf_start`.
    buf: Vec<u8>,
    buf_start: u64,
    crc: crc32fast::Hasher,
    size: u64,
}

impl SnapshotSink {
    fn feed(&mut self, out: &mut Output, chunk: &[u8]) -> Result<(), SinkError> {
        // Whole-file CRC over every byte but the last four (the CRC itself).
        let chunk_start = self.buf_start + self.buf.len() as u64;
        let crc_end = self.size - 4;
        if chunk_start < crc_end {
            let n = ((crc_end - chunk_start) as usize).min(chunk.len());
            self.crc.update(&chunk[..n]);
        }
        self.buf.extend_from_slice(chunk);
        let ps = out.page_size as usize;
        let g = u32::from(self.reader.header().pages_per_frame);
        while let Some(e) = self.reader.index().get(self.next_frame as usize).copied() {
            let end = e.offset + u64::from(e.len);
            if end > self.buf_start + self.buf.len() as u64 {
                break;
            }
            let s = (e.offset - self.buf_start) as usize;
            let frame = &self.buf[s..s + e.len as usize];
            let pages = self.reader.decode_frame(self.next_frame, frame)?;
            debug_assert!(pages.iter().all(|p| p.len() == ps));
            out.append_pages(self.next_frame * g + 1, &pages)?;
            self.next_frame += 1;
            // Drop what is consumed.
            let consumed = (end - self.buf_start) as usize;
            self.buf.drain(..consumed);
            self.buf_start = end;
        }
        Ok(())
    }

    fn finish(self, out: &Output) -> Result<(), SinkError> {
        let h = self.reader.header();
        if (self.next_frame as usize) < self.reader.index().len() {
            return Err(CodecError::Truncated {
                what: "snapshot frames",
                needed: self.size,
                available: self.buf_start + self.buf.len() as u64,
            }
            .into());
        }
        if out.hashes.page_count() != h.page_count {
            return Err(CodecError::PageCountMismatch {
                declared: h.page_count,
                written: u64::from(out.hashes.page_count()),
            }
            .into());
        }
        if out.hashes.checksum() != h.db_checksum {
            return Err(CodecError::DbChecksum {
                stored: h.db_checksum,
                computed: out.hashes.checksum(),
            }
            .into());
        }
        // The tail still buffered ends with the stored CRC.
        let tail = &self.buf;
        if tail.len() < 4 {
            return Err(CodecError::Truncated {
                what: "snapshot",
                needed: self.size,
                available: self.buf_start + tail.len() as u64,
            }
            .into());
        }
        if !tail.ends_with(&self.suffix) {
            return Err(CodecError::BadHeader("snapshot index changed between reads").into());
        }
        let stored = u32::from_be_bytes(tail[tail.len() - 4..].try_into().expect("4 bytes"));
        let computed = self.crc.finalize();
        if stored != computed {
            return Err(CodecError::Checksum {
                region: codec::Region::File,
                stored,
                computed,
            }
            .into());
        }
        Ok(())
    }
}

/// One segment to apply, and where to stop.
struct SegmentJob {
    key: String,
    db: String,
    page_size: u32,
    key_from: u64,
    key_to: u64,
    /// The chain's txid before this segment.
    at: u64,
    epoch_owner: Option<u64>,
    goal: u64,
    time_ms: Option<i64>,
}

struct SegmentDone {
    applied: u64,
    last_txid: u64,
    last_ms: i64,
    /// A transaction committed after the target time was reached.
    time_reached: bool,
}

impl SegmentJob {
    fn corrupt(&self, source: CodecError) -> RestoreError {
        RestoreError::Corrupt {
            key: self.key.clone(),
            what: "segment",
            source,
        }
    }

    fn apply(&self, out: &mut Output, bytes: &[u8]) -> Result<SegmentDone, RestoreError> {
        let mut r = SegmentReader::new(bytes).map_err(|e| self.corrupt(e))?;
        let h = r.header().clone();
        let info = SegInfo {
            key: self.key.clone(),
            from: self.key_from,
            to: self.key_to,
            size: bytes.len() as u64,
        };
        check_segment_key(&info, &h, &self.db, self.page_size)?;
        let mut chain = Chain::new(self.at, out.hashes.checksum());
        chain.enters(
            &self.key,
            (h.txid_from, h.txid_to),
            h.epoch,
            h.pre_checksum,
            self.epoch_owner,
        )?;
        let mut done = SegmentDone {
            applied: 0,
            last_txid: self.at,
            last_ms: 0,
            time_reached: false,
        };
        let mut whole = true;
        for t in &mut r {
            let t = t.map_err(|e| self.corrupt(e))?;
            if t.txid <= self.at {
                continue; // already in the snapshot this segment is entered from
            }
            if let Some(limit) = self.time_ms {
                if t.timestamp_ms > limit {
                    done.time_reached = true;
                    whole = false;
                    break;
                }
            }
            // The segment's epoch was checked on entry.
            chain.apply(&self.key, &t, None, |t| out.apply_txn(t).map(Some))?;
            done.applied += 1;
            done.last_txid = t.txid;
            done.last_ms = t.timestamp_ms;
            if t.txid >= self.goal {
                whole = t.txid == h.txid_to;
                break;
            }
        }
        if whole {
            // Read to the end: check that header and body agree throughout.
            r.finish().map_err(|e| self.corrupt(e))?;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_errors_read_as_truncated_or_corrupt() {
        let t = CodecError::LengthMismatch {
            expected: 10,
            actual: 5,
        };
        assert_eq!(classify(&t), "truncated");
        let c = CodecError::Checksum {
            region: codec::Region::File,
            stored: 1,
            computed: 2,
        };
        assert_eq!(classify(&c), "corrupt");
        let e = RestoreError::Corrupt {
            key: "k.seg".into(),
            what: "segment",
            source: c,
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with("k.seg: corrupt segment: whole-file checksum mismatch"),
            "{msg}"
        );
    }

    #[test]
    fn gap_messages() {
        let e = RestoreError::ChainGap {
            key: "x-7-9.seg".into(),
            from: 7,
            at: 5,
        };
        assert_eq!(
            e.to_string(),
            "txid chain gap: segment x-7-9.seg starts at txid 7 but the chain is at 5 (txid 6 is missing)"
        );
        let e = RestoreError::ChainGap {
            key: "k".into(),
            from: 9,
            at: 5,
        };
        assert!(e.to_string().ends_with("(txids 6..=8 are missing)"));
        let e = RestoreError::ChainGap {
            key: "k".into(),
            from: 4,
            at: 5,
        };
        assert!(e.to_string().contains("overlaps"));
    }

    #[test]
    fn sidecar_names() {
        let s = sidecars(Path::new("/a/b.db"));
        assert_eq!(
            s,
            vec![
                PathBuf::from("/a/b.db-wal"),
                PathBuf::from("/a/b.db-shm"),
                PathBuf::from("/a/b.db-journal")
            ]
        );
        assert_eq!(parent_dir(Path::new("x.db")), PathBuf::from("."));
    }
}
