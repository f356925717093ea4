//! `membridge restore`: rebuild a database from the bucket at any published txid
//! or time, verifying every object and the checksum chain on the way.
//!
//! The latest snapshot at or before the target, then the segments that continue
//! it, transaction by transaction: each transaction's pre-checksum must equal
//! the running whole-database checksum, and its post-checksum the result. Where
//! several segments start at the same txid (a deposed primary's tail), the one
//! of the epoch the manifest's history names, continuing the chain, is used.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::manifest::{self, parse_hex64, Manifest};
use crate::journal::codec;
use crate::remote::{Layout, ObjectStore, StoreError};
use crate::sqlite::checksum::PageHashes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Latest,
    Txid(u64),
    /// The last transaction committed at or before this time.
    Time(DateTime<Utc>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub txid: u64,
    pub checksum: u64,
    pub size_pages: u32,
    pub snapshot_key: String,
    pub segments_applied: usize,
    pub bytes_downloaded: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error("no manifest in the bucket for this project: nothing was ever published")]
    NoManifest,
    #[error("database {0:?} is not in the bucket's manifest")]
    UnknownDb(String),
    #[error("txid {target} is past the published head {head}")]
    PastHead { target: u64, head: u64 },
    #[error("no snapshot at or before {0} is left (older history was pruned)")]
    NoSnapshot(String),
    #[error("{key}: {source}")]
    Object {
        key: String,
        source: Box<StoreError>,
    },
    #[error("{key}: {why}")]
    Corrupt { key: String, why: String },
    #[error("chain broken after txid {at}: {why}")]
    Chain { at: u64, why: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} exists; pass --force to replace it")]
    Exists(PathBuf),
}

type Result<T> = std::result::Result<T, RestoreError>;

fn corrupt(key: &str, why: impl std::fmt::Display) -> RestoreError {
    RestoreError::Corrupt {
        key: key.to_string(),
        why: why.to_string(),
    }
}

async fn fetch(store: &dyn ObjectStore, key: &str) -> Result<bytes::Bytes> {
    store
        .get(key)
        .await
        .map(|g| g.body)
        .map_err(|source| RestoreError::Object {
            key: key.to_string(),
            source: Box::new(source),
        })
}

/// The database image being rebuilt, with its running checksum.
struct Image {
    bytes: Vec<u8>,
    hashes: PageHashes,
    txid: u64,
}

impl Image {
    fn apply(&mut self, key: &str, t: &crate::journal::Txn) -> Result<()> {
        let at = self.txid;
        if t.txid != at + 1 {
            return Err(RestoreError::Chain {
                at,
                why: format!("{key} holds txid {} next", t.txid),
            });
        }
        if t.pre_checksum != self.hashes.checksum() {
            return Err(RestoreError::Chain {
                at,
                why: format!(
                    "{key}: txid {} expects checksum {:016x} before it, the database has {:016x}",
                    t.txid,
                    t.pre_checksum,
                    self.hashes.checksum()
                ),
            });
        }
        let ps = self.hashes.page_size() as usize;
        self.bytes.resize(t.db_size_pages as usize * ps, 0);
        for (pgno, page) in &t.pages {
            let off = (*pgno as usize - 1) * ps;
            self.bytes[off..off + ps].copy_from_slice(page);
        }
        let post = self
            .hashes
            .apply(
                t.pages.iter().map(|(n, p)| (*n, p.as_ref())),
                t.db_size_pages,
            )
            .map_err(|e| corrupt(key, e))?;
        if post != t.post_checksum {
            return Err(corrupt(
                key,
                format!(
                    "txid {}: pages give checksum {post:016x}, the segment says {:016x}",
                    t.txid, t.post_checksum
                ),
            ));
        }
        self.txid = t.txid;
        Ok(())
    }
}

/// Rebuild `db` at `target` into `out` (atomically; refuses an existing file
/// unless `force`).
#[allow(clippy::too_many_arguments)]
pub async fn restore(
    store: &dyn ObjectStore,
    layout: &Layout,
    canonical_id: &str,
    db: &str,
    target: Target,
    out: &Path,
    force: bool,
    progress: bool,
) -> Result<RestoreReport> {
    if out.exists() && !force {
        return Err(RestoreError::Exists(out.to_path_buf()));
    }
    let m = manifest::load(store, layout, canonical_id)
        .await?
        .ok_or(RestoreError::NoManifest)?
        .manifest;
    let entry = m
        .databases
        .get(db)
        .ok_or_else(|| RestoreError::UnknownDb(db.to_string()))?;
    let head = entry.head_txid;
    let last = match target {
        Target::Txid(t) if t > head => return Err(RestoreError::PastHead { target: t, head }),
        Target::Txid(t) => t,
        _ => head,
    };
    let mut downloaded = 0u64;
    let (snap_key, mut image) =
        load_snapshot(store, layout, db, last, target, &mut downloaded).await?;
    let bar = progress_bar(progress, last.saturating_sub(image.txid));
    let mut segments = list_segments(store, layout, db).await?;
    segments.sort();
    let mut applied = 0;
    'chain: while image.txid < last {
        let at = image.txid;
        let candidates: Vec<&(u64, u64, String)> = segments
            .iter()
            .filter(|(from, _, _)| *from == at + 1)
            .collect();
        if candidates.is_empty() {
            if let Some((from, _, key)) =
                segments.iter().find(|(f, t, _)| *f > at + 1 && *t <= head)
            {
                return Err(RestoreError::Chain {
                    at,
                    why: format!("segment {key} starts at txid {from} but the chain is at {at}"),
                });
            }
            return Err(RestoreError::Chain {
                at,
                why: format!("no segment starts at txid {} (head is {head})", at + 1),
            });
        }
        let mut last_err = None;
        for (_, _, key) in candidates {
            let body = fetch(store, key).await?;
            downloaded += body.len() as u64;
            let seg = match codec::decode_segment(&body) {
                Ok(s) => s,
                Err(e) => {
                    last_err = Some(corrupt(key, e));
                    continue;
                }
            };
            if !epoch_ok(&m, db, &seg) || seg.header.pre_checksum != image.hashes.checksum() {
                last_err = Some(RestoreError::Chain {
                    at,
                    why: format!(
                        "{key} (node {}, epoch {}) does not continue the published history",
                        seg.header.node_id, seg.header.epoch
                    ),
                });
                continue;
            }
            for t in &seg.txns {
                if t.txid > last {
                    break;
                }
                if let Target::Time(when) = target {
                    if t.timestamp_ms > when.timestamp_millis() {
                        break 'chain;
                    }
                }
                image.apply(key, t)?;
                if let Some(b) = &bar {
                    b.inc(1);
                }
            }
            applied += 1;
            continue 'chain;
        }
        return Err(last_err.expect("at least one candidate was tried"));
    }
    if let Target::Txid(t) = target {
        debug_assert_eq!(image.txid, t);
    }
    if image.txid == head && parse_hex64(&entry.head_checksum) != Some(image.hashes.checksum()) {
        return Err(corrupt(
            &layout.manifest(),
            format!(
                "head checksum {} does not match the rebuilt database {:016x}",
                entry.head_checksum,
                image.hashes.checksum()
            ),
        ));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    write_atomically(out, &image.bytes)?;
    Ok(RestoreReport {
        txid: image.txid,
        checksum: image.hashes.checksum(),
        size_pages: image.hashes.page_count(),
        snapshot_key: snap_key,
        segments_applied: applied,
        bytes_downloaded: downloaded,
    })
}

/// Segments of an epoch other than the one the manifest's history gives for
/// their txids are a deposed primary's and never part of the published chain.
fn epoch_ok(m: &Manifest, db: &str, seg: &codec::Segment) -> bool {
    seg.txns.iter().all(|t| match m.epoch_of(db, t.txid) {
        Some(e) => t.epoch == e,
        None => true,
    })
}

async fn list_segments(
    store: &dyn ObjectStore,
    layout: &Layout,
    db: &str,
) -> Result<Vec<(u64, u64, String)>> {
    let prefix = layout.segment_prefix(db);
    let objs = store
        .list(&prefix)
        .await
        .map_err(|source| RestoreError::Object {
            key: prefix,
            source: Box::new(source),
        })?;
    Ok(objs
        .into_iter()
        .filter_map(|o| {
            let k = layout.parse_segment(&o.key)?;
            (k.db == db).then_some((k.from, k.to, o.key))
        })
        .collect())
}

/// The newest snapshot at or before the target, downloaded and verified.
async fn load_snapshot(
    store: &dyn ObjectStore,
    layout: &Layout,
    db: &str,
    last: u64,
    target: Target,
    downloaded: &mut u64,
) -> Result<(String, Image)> {
    let prefix = layout.snapshot_prefix(db);
    let mut snaps: Vec<(u64, String)> = store
        .list(&prefix)
        .await
        .map_err(|source| RestoreError::Object {
            key: prefix.clone(),
            source: Box::new(source),
        })?
        .into_iter()
        .filter_map(|o| {
            let k = layout.parse_snapshot(&o.key)?;
            (k.db == db && k.txid <= last).then_some((k.txid, o.key))
        })
        .collect();
    snaps.sort();
    while let Some((txid, key)) = snaps.pop() {
        let body = fetch(store, &key).await?;
        *downloaded += body.len() as u64;
        let (header, bytes) = codec::decode_snapshot(&body).map_err(|e| corrupt(&key, e))?;
        if header.txid != txid {
            return Err(corrupt(
                &key,
                format!("its header says txid {}", header.txid),
            ));
        }
        if let Target::Time(when) = target {
            if header.timestamp_ms > when.timestamp_millis() && txid > 0 {
                continue; // taken after the target time: an older one may do
            }
        }
        let hashes =
            PageHashes::from_bytes(&bytes, header.page_size).map_err(|e| corrupt(&key, e))?;
        if hashes.checksum() != header.db_checksum {
            return Err(corrupt(&key, "image does not match its checksum"));
        }
        return Ok((
            key,
            Image {
                bytes,
                hashes,
                txid,
            },
        ));
    }
    Err(RestoreError::NoSnapshot(match target {
        Target::Time(t) => t.to_rfc3339(),
        _ => format!("txid {last}"),
    }))
}

fn progress_bar(enabled: bool, len: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !enabled || len < 1000 || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "restoring {bar:40} {pos}/{len} transactions {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

fn write_atomically(out: &Path, bytes: &[u8]) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RestoreError::Io { path, source }
    };
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.membridge-restore-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io(out))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
