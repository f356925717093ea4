//! The old tool's snapshot, kept current for nodes not yet migrated: the whole
//! database at `projects/<cid>/sqlite/claude-mem.db`, its `.sha256` and a
//! `manifest.json` in the old format, so an old-style pull keeps working.

use std::path::Path;

use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::remote::{Layout, ObjectStore, PutMode, StoreError};

/// The only database the old tool knew.
pub const LEGACY_DB: &str = "claude-mem.db";

#[derive(Debug, Serialize)]
pub struct LegacyManifest {
    pub project: String,
    pub canonical_id: String,
    pub timestamp: String,
    pub source_host: String,
    pub db_size: u64,
    pub sha256: String,
    /// Row counts; `null` where the table does not exist.
    pub observations: Option<i64>,
    pub session_summaries: Option<i64>,
    pub user_prompts: Option<i64>,
    pub tables: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error("legacy snapshot: reading {path}: {why}")]
    Image { path: String, why: String },
    #[error("legacy snapshot: {0}")]
    Store(#[from] StoreError),
}

/// Counts and table names, read from a standalone image without writing
/// anything next to it (`immutable=1`: no journal, no -wal, no -shm).
fn describe(image: &Path) -> Result<(Vec<String>, [Option<i64>; 3]), rusqlite::Error> {
    let uri = format!("file:{}?immutable=1", image.display());
    let c = rusqlite::Connection::open_with_flags(
        uri,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
    )?;
    let mut st = c.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?;
    let tables: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    let count = |t: &str| -> Result<Option<i64>, rusqlite::Error> {
        if !tables.iter().any(|n| n == t) {
            return Ok(None);
        }
        c.query_row(&format!("SELECT count(*) FROM \"{t}\""), [], |r| r.get(0))
            .map(Some)
    };
    let counts = [
        count("observations")?,
        count("session_summaries")?,
        count("user_prompts")?,
    ];
    Ok((tables, counts))
}

/// Publish `image` (a consistent, standalone copy of claude-mem.db) the way the
/// old tool's push did.
pub async fn publish(
    store: &dyn ObjectStore,
    layout: &Layout,
    project_id: &str,
    canonical_id: &str,
    node_id: &str,
    image: &Path,
) -> Result<LegacyManifest, LegacyError> {
    let err = |why: String| LegacyError::Image {
        path: image.display().to_string(),
        why,
    };
    let bytes = tokio::fs::read(image)
        .await
        .map_err(|e| err(e.to_string()))?;
    let (tables, [observations, session_summaries, user_prompts]) = {
        let image = image.to_path_buf();
        tokio::task::spawn_blocking(move || describe(&image))
            .await
            .map_err(|e| err(e.to_string()))?
            .map_err(|e| err(e.to_string()))?
    };
    let sha = hex::encode(Sha256::digest(&bytes));
    let manifest = LegacyManifest {
        project: project_id.to_string(),
        canonical_id: canonical_id.to_string(),
        timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        source_host: node_id.to_string(),
        db_size: bytes.len() as u64,
        sha256: sha.clone(),
        observations,
        session_summaries,
        user_prompts,
        tables,
    };
    // Database first, manifest last: an old reader that sees the new manifest
    // finds the matching database and checksum.
    store
        .put(&layout.legacy_db(), Bytes::from(bytes), PutMode::Overwrite)
        .await?;
    store
        .put(
            &layout.legacy_sha256(),
            Bytes::from(format!("{sha}  {LEGACY_DB}\n")),
            PutMode::Overwrite,
        )
        .await?;
    let body = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    store
        .put(
            &layout.legacy_manifest(),
            Bytes::from(body),
            PutMode::Overwrite,
        )
        .await?;
    Ok(manifest)
}
