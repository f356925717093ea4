//! `manifest.json`: the one mutable object that says what is published.
//!
//! Segments and snapshots are immutable and written create-only; the manifest is
//! only ever advanced by `If-Match` compare-and-swap, so a publication is the
//! moment the manifest names it. Objects the manifest does not reach (a crashed
//! upload, a fenced primary's tail) are ignored by readers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::remote::{Layout, ObjectStore, PutMode, StoreError};

pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub canonical_id: String,
    /// Epoch of the lease under which the manifest was last advanced.
    pub epoch: u64,
    /// Where each epoch's history starts: txids at or above `start_txid` (per
    /// database) belong to that epoch. Segments of another epoch in that range
    /// are a deposed primary's and are ignored.
    #[serde(default)]
    pub epochs: Vec<EpochStart>,
    pub updated_at: String,
    pub updated_by: String,
    pub databases: BTreeMap<String, DbManifest>,
    /// Set by `membridge migrate` when the manifest was seeded from the old
    /// tool's `sqlite/` snapshot; kept by every later advance (they clone the
    /// manifest), so a later `migrate` knows the project was adopted already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted: Option<Adoption>,
    /// Replicated files (`MEMBRIDGE_REPLICATE_FILES`), by path relative to
    /// the mount. Absent when there are none, so such a manifest reads as
    /// before to every version.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, FileEntry>,
    /// Fields this version does not know (a newer writer's): kept as read, so
    /// advancing the manifest here does not drop them.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// One replicated file's current version (see `super::files`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
    pub size: u64,
    /// The object holding the content (`files/<name>/<sha256>`).
    pub key: String,
    /// Removed on the primary; `sha256`, `size` and `key` still name the last
    /// version before that.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// Where an adopted project's history starts (see [`Manifest::adopted`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adoption {
    /// The legacy object the first snapshot was made from.
    pub from_key: String,
    /// Its SHA-256, as verified against `claude-mem.db.sha256`.
    pub sha256: String,
    /// `timestamp` and `source_host` of the old tool's `sqlite/manifest.json`.
    #[serde(default)]
    pub legacy_timestamp: Option<String>,
    #[serde(default)]
    pub legacy_source_host: Option<String>,
    /// The old tool's lease epoch kept as the manifest's epoch (None: no lease).
    pub lease_epoch: Option<u64>,
    pub by: String,
    pub at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStart {
    pub epoch: u64,
    /// First txid of this epoch, per database.
    pub start_txid: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbManifest {
    /// A new generation starts from a fresh snapshot when history could not be
    /// continued (e.g. the database was changed outside membridge).
    pub generation: u64,
    pub head_txid: u64,
    /// Whole-database checksum at `head_txid`, hex.
    pub head_checksum: String,
    pub page_size: u32,
    pub size_pages: u32,
    pub snapshot: Option<SnapshotRef>,
    /// Older snapshots still within retention, oldest first (point-in-time restore).
    #[serde(default)]
    pub older_snapshots: Vec<SnapshotRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    pub txid: u64,
    pub key: String,
    pub checksum: String,
    pub size_pages: u32,
    pub taken_at: String,
}

pub fn hex64(v: u64) -> String {
    format!("{v:016x}")
}

pub fn parse_hex64(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 16).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{key}: not a membridge manifest: {why}")]
    Malformed { key: String, why: String },
    #[error("{key}: belongs to project {found}, not {expected}")]
    ForeignProject {
        key: String,
        found: String,
        expected: String,
    },
    #[error("{key}: format {0} is newer than this membridge understands ({FORMAT})", .found)]
    TooNew { key: String, found: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Manifest {
    pub fn new(canonical_id: &str, node: &str, epoch: u64) -> Manifest {
        Manifest {
            format: FORMAT,
            canonical_id: canonical_id.to_string(),
            epoch,
            epochs: Vec::new(),
            updated_at: chrono::Utc::now().to_rfc3339(),
            updated_by: node.to_string(),
            databases: BTreeMap::new(),
            adopted: None,
            files: BTreeMap::new(),
            extra: serde_json::Map::new(),
        }
    }

    pub fn parse(key: &str, body: &[u8], canonical_id: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest = serde_json::from_slice(body).map_err(|e| ManifestError::Malformed {
            key: key.to_string(),
            why: e.to_string(),
        })?;
        if m.format > FORMAT {
            return Err(ManifestError::TooNew {
                key: key.to_string(),
                found: m.format,
            });
        }
        if m.canonical_id != canonical_id {
            return Err(ManifestError::ForeignProject {
                key: key.to_string(),
                found: m.canonical_id,
                expected: canonical_id.to_string(),
            });
        }
        Ok(m)
    }

    /// The epoch that owns `txid` of `db` according to the epoch history.
    pub fn epoch_of(&self, db: &str, txid: u64) -> Option<u64> {
        self.epochs
            .iter()
            .filter(|e| e.start_txid.get(db).is_some_and(|s| *s <= txid))
            .map(|e| e.epoch)
            .max()
    }
}

/// A manifest as read, with the ETag that a compare-and-swap must name.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub manifest: Manifest,
    pub etag: String,
}

/// Read the manifest; `None` if the project has none yet.
pub async fn load(
    store: &dyn ObjectStore,
    layout: &Layout,
    canonical_id: &str,
) -> Result<Option<Versioned>, ManifestError> {
    let key = layout.manifest();
    match store.get(&key).await {
        Ok(got) => Ok(Some(Versioned {
            manifest: Manifest::parse(&key, &got.body, canonical_id)?,
            etag: got.etag,
        })),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Write `next` if the manifest is still at `prev` (its ETag), or create it if
/// `prev` is `None`. A lost race is `StoreError::PreconditionFailed`.
pub async fn swap(
    store: &dyn ObjectStore,
    layout: &Layout,
    prev: Option<&str>,
    next: &Manifest,
) -> Result<String, StoreError> {
    let body = serde_json::to_vec_pretty(next).expect("manifest serializes");
    let mode = match prev {
        Some(etag) => PutMode::IfMatch(etag.to_string()),
        None => PutMode::CreateOnly,
    };
    store.put(&layout.manifest(), body.into(), mode).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &serde_json::Value) -> Manifest {
        Manifest::parse("m", &serde_json::to_vec(v).unwrap(), "cid").unwrap()
    }

    #[test]
    fn files_round_trip() {
        let mut m = Manifest::new("cid", "a", 3);
        m.files.insert(
            ".cwd-remap-applied-v1".into(),
            FileEntry {
                sha256: "ab".repeat(32),
                size: 24,
                key: "projects/cid/files/.cwd-remap-applied-v1/abab".into(),
                deleted: false,
            },
        );
        m.files.insert(
            "modes/x.json".into(),
            FileEntry {
                sha256: "cd".repeat(32),
                size: 2,
                key: "projects/cid/files/modes/x.json/cdcd".into(),
                deleted: true,
            },
        );
        let body = serde_json::to_value(&m).unwrap();
        assert_eq!(body["files"][".cwd-remap-applied-v1"]["size"], 24);
        // `deleted` is written only when true.
        assert!(body["files"][".cwd-remap-applied-v1"]
            .get("deleted")
            .is_none());
        assert_eq!(body["files"]["modes/x.json"]["deleted"], true);
        assert_eq!(parse(&body), m);
    }

    #[test]
    fn a_manifest_without_files_reads_and_writes_as_before() {
        let m = Manifest::new("cid", "a", 1);
        let body = serde_json::to_value(&m).unwrap();
        assert!(body.get("files").is_none(), "{body}");
        let old = serde_json::json!({
            "format": 1, "canonical_id": "cid", "epoch": 2, "epochs": [],
            "updated_at": "t", "updated_by": "n", "databases": {}
        });
        let read = parse(&old);
        assert!(read.files.is_empty() && read.extra.is_empty());
        assert_eq!(serde_json::to_value(&read).unwrap(), old);
    }

    #[test]
    fn unknown_fields_survive_an_advance() {
        let newer = serde_json::json!({
            "format": 1, "canonical_id": "cid", "epoch": 2,
            "updated_at": "t", "updated_by": "n", "databases": {},
            "files": {"a": {"sha256": "00", "size": 0, "key": "k", "future": 1}},
            "someday": {"x": [1, 2]}
        });
        let mut m = parse(&newer);
        assert_eq!(m.extra["someday"], serde_json::json!({"x": [1, 2]}));
        m.epoch = 3;
        let out = serde_json::to_value(&m).unwrap();
        assert_eq!(out["someday"], newer["someday"]);
        assert_eq!(out["epoch"], 3);
        assert_eq!(out["files"]["a"]["key"], "k");
    }
}
