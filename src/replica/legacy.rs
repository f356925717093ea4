//! The old tool's snapshot, kept up to date for nodes not yet migrated
//! (docs/FORMAT.md): `sqlite/claude-mem.db` (the whole database file),
//! `sqlite/claude-mem.db.sha256` and `sqlite/manifest.json`, byte for byte
//! what the old tool's `push_sqlite` writes, with plain puts and in its order
//! (database, digest, manifest), so that its `pull_sqlite` keeps working.
//!
//! Compatibility notes, from the old tool's source (`sqlite_minio_sync.py`):
//! - `tables` is the *number* of rows of `sqlite_master` with `type='table'`
//!   (internal tables such as `sqlite_sequence` included), as the old push
//!   writes it; the names are in the extra field `table_names`, which old
//!   readers ignore.
//! - A count whose table does not exist in the image is **omitted**, not
//!   `null`: the old pull compares `local_obs > manifest.get("observations", 0)`
//!   and the old push `remote_obs > obs_count`; with `null` both raise a
//!   `TypeError` in Python 3, whereas a missing key reads as 0.
//! - `timestamp` is Python's `datetime.now(timezone.utc).isoformat()`, i.e.
//!   `2026-02-25T10:11:12.123456+00:00`.

use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::remote::keys::LEGACY_DB_NAME;
use crate::remote::{Layout, ObjectStore, PutMode, StoreError};

/// `sqlite/manifest.json`, in the old tool's field order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyManifest {
    /// `CLAUDE_PROJECT_ID` (the project name, not the canonical id).
    pub project: String,
    pub canonical_id: String,
    /// ISO-8601 UTC with microseconds and `+00:00`, as Python writes it.
    pub timestamp: String,
    pub source_host: String,
    /// Size of `claude-mem.db` in bytes.
    pub db_size: u64,
    /// Lowercase hex SHA-256 of `claude-mem.db`.
    pub sha256: String,
    /// Row counts; absent when the table does not exist (see module docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_summaries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_prompts: Option<u64>,
    /// Number of tables (`sqlite_master` rows with `type='table'`).
    pub tables: u64,
    /// Their names, in `sqlite_master` order (membridge's addition).
    #[serde(default)]
    pub table_names: Vec<String>,
    /// The txid of the database this copy holds (membridge's addition, and
    /// its mark: a manifest without it was written by the old tool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membridge_txid: Option<u64>,
}

/// The only database the old tool knew.
pub const LEGACY_DB: &str = LEGACY_DB_NAME;

/// What was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyPublished {
    pub db_key: String,
    pub sha256_key: String,
    pub manifest_key: String,
    pub manifest: LegacyManifest,
}

#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: not a readable SQLite database: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{key}: not the old tool's manifest: {why}")]
    Malformed { key: String, why: String },
    /// The copy there was not written by membridge: left to the legacy watch.
    #[error("{key} was written by the old tool: left for the legacy watch, which keeps it aside before replacing it")]
    NotOurs { key: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What membridge reads from the old tool's `sqlite/manifest.json`: the
/// fields `migrate` checks or reports. Each may be absent or null (old
/// versions of the tool wrote fewer); other fields are not looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegacyManifestFields {
    pub canonical_id: Option<String>,
    pub source_host: Option<String>,
    pub timestamp: Option<String>,
    pub sha256: Option<String>,
    /// Written by membridge (it has `table_names` or `membridge_txid`, which
    /// the old tool never writes), not by the old tool.
    pub by_membridge: bool,
    pub membridge_txid: Option<u64>,
}

/// Reads `sqlite/manifest.json` (`body`, fetched from `key`). Refused, with
/// the position or the field at fault: text that is not one JSON object, and
/// a field above that is not a string (the old tool writes them all as strings).
pub fn read_manifest(key: &str, body: &[u8]) -> Result<LegacyManifestFields, LegacyError> {
    let malformed = |why: String| LegacyError::Malformed {
        key: key.to_string(),
        why,
    };
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| malformed(format!("not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| malformed("not a JSON object".into()))?;
    let field = |name: &str| match obj.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(malformed(format!(
            "field `{name}` is {}, expected a string",
            json_kind(other)
        ))),
    };
    Ok(LegacyManifestFields {
        canonical_id: field("canonical_id")?,
        source_host: field("source_host")?,
        timestamp: field("timestamp")?,
        sha256: field("sha256")?,
        by_membridge: obj.contains_key("table_names") || obj.contains_key("membridge_txid"),
        membridge_txid: obj
            .get("membridge_txid")
            .and_then(serde_json::Value::as_u64),
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Uploads `db_image_path`, a consistent standalone database file (rollback
/// header, or WAL header with no `-wal`), as the old tool's snapshot of the
/// project. The image is opened read-only with `immutable=1`, so SQLite
/// creates no sidecar next to it.
pub async fn publish_legacy(
    store: &dyn ObjectStore,
    layout: &Layout,
    project_id: &str,
    canonical_id: &str,
    node_id: &str,
    db_image_path: &Path,
) -> Result<LegacyPublished, LegacyError> {
    publish_legacy_at(
        store,
        layout,
        project_id,
        canonical_id,
        node_id,
        db_image_path,
        None,
    )
    .await
}

/// [`publish_legacy`] of the image at `txid` (recorded as `membridge_txid`).
pub async fn publish_legacy_at(
    store: &dyn ObjectStore,
    layout: &Layout,
    project_id: &str,
    canonical_id: &str,
    node_id: &str,
    db_image_path: &Path,
    txid: Option<u64>,
) -> Result<LegacyPublished, LegacyError> {
    let path = db_image_path.to_path_buf();
    let (db_size, sha256, stats) = tokio::task::spawn_blocking(move || read_image(&path))
        .await
        .map_err(|e| LegacyError::Io {
            path: db_image_path.to_path_buf(),
            op: "read task",
            source: std::io::Error::other(e.to_string()),
        })??;
    let manifest = LegacyManifest {
        project: project_id.to_string(),
        canonical_id: canonical_id.to_string(),
        timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false),
        source_host: node_id.to_string(),
        db_size,
        sha256: sha256.clone(),
        observations: stats.observations,
        session_summaries: stats.session_summaries,
        user_prompts: stats.user_prompts,
        tables: stats.table_names.len() as u64,
        table_names: stats.table_names,
        membridge_txid: txid,
    };
    let db_key = layout.legacy_db();
    let sha256_key = layout.legacy_sha256();
    let manifest_key = layout.legacy_manifest();
    // Streamed from the file: the old tool's copy is the whole database.
    store
        .put_file(&db_key, db_image_path, PutMode::Overwrite)
        .await?;
    let digest_line = format!("{sha256}  {LEGACY_DB_NAME}\n");
    store
        .put(&sha256_key, Bytes::from(digest_line), PutMode::Overwrite)
        .await?;
    let json = serde_json::to_vec_pretty(&manifest).expect("legacy manifest serializes");
    store
        .put(&manifest_key, Bytes::from(json), PutMode::Overwrite)
        .await?;
    Ok(LegacyPublished {
        db_key,
        sha256_key,
        manifest_key,
        manifest,
    })
}

/// [`publish_legacy`] under the name the uploader calls it by (`txid`: the
/// image's, recorded in the manifest so that `status` can show its age).
/// A copy membridge did not write (the old tool's) is left for
/// `coexist::LegacyWatch`, which keeps it aside before replacing it
/// (docs/ARCHITECTURE.md, "Living beside the old tool").
pub async fn publish(
    store: &dyn ObjectStore,
    layout: &Layout,
    project_id: &str,
    canonical_id: &str,
    node_id: &str,
    image: &Path,
    txid: Option<u64>,
) -> Result<LegacyPublished, LegacyError> {
    let key = layout.legacy_manifest();
    match store.get(&key).await {
        Ok(got) => {
            if !read_manifest(&key, &got.body).is_ok_and(|m| m.by_membridge) {
                return Err(LegacyError::NotOurs { key });
            }
        }
        Err(StoreError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    publish_legacy_at(
        store,
        layout,
        project_id,
        canonical_id,
        node_id,
        image,
        txid,
    )
    .await
}

/// Row counts of the tables the old tool's manifest reports, and the table
/// names; shared with `doctor`, which counts a live database the same way.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImageStats {
    pub observations: Option<u64>,
    pub session_summaries: Option<u64>,
    pub user_prompts: Option<u64>,
    pub table_names: Vec<String>,
}

impl ImageStats {
    /// "12 observations, 3 session_summaries" (tables that exist only).
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("observations", self.observations),
            ("session_summaries", self.session_summaries),
            ("user_prompts", self.user_prompts),
        ]
        .iter()
        .filter_map(|(n, c)| c.map(|c| format!("{c} {n}")))
        .collect();
        if parts.is_empty() {
            format!("{} tables", self.table_names.len())
        } else {
            parts.join(", ")
        }
    }
}

/// The image's size, SHA-256 (hashed as it is read, a buffer at a time) and
/// row counts.
fn read_image(path: &Path) -> Result<(u64, String, ImageStats), LegacyError> {
    let io = |op| {
        move |source| LegacyError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let mut f = std::fs::File::open(path).map_err(io("open"))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io("read"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    let sha256 = hex::encode(h.finalize());
    let stats = image_stats(path).map_err(|source| LegacyError::Sqlite {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((size, sha256, stats))
}

/// A standalone image (nobody writes it), opened read-only with
/// `immutable=1`, so SQLite creates no sidecar next to it.
pub fn open_image(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let uri = format!("file:{}?immutable=1", uri_path(path));
    rusqlite::Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

/// A database read-only without leaving sidecars behind: as an image when
/// nobody is writing it (no `-wal`, no `-shm`), else through SQLite's locks.
/// Only for a file outside a mount; through a mount use plain `mode=ro`.
pub fn open_quiet(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let side = |s: &str| {
        let mut p = path.as_os_str().to_os_string();
        p.push(s);
        std::path::PathBuf::from(p).exists()
    };
    if !side("-wal") && !side("-shm") {
        return open_image(path);
    }
    open_ro(path)
}

/// Read-only through SQLite's locks (`mode=ro`), with a short busy timeout.
pub fn open_ro(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let c = rusqlite::Connection::open_with_flags(
        format!("file:{}?mode=ro", uri_path(path)),
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    c.busy_timeout(std::time::Duration::from_secs(2))?;
    Ok(c)
}

fn image_stats(path: &Path) -> rusqlite::Result<ImageStats> {
    stats(&open_image(path)?)
}

/// Counts of `conn`'s main database; a count whose table does not exist is `None`.
pub fn stats(conn: &rusqlite::Connection) -> rusqlite::Result<ImageStats> {
    let table_names: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type='table'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let count = |t: &str| -> rusqlite::Result<Option<u64>> {
        if !table_names.iter().any(|n| n == t) {
            return Ok(None);
        }
        let n: i64 = conn.query_row(&format!("SELECT COUNT(*) FROM \"{t}\""), [], |r| r.get(0))?;
        Ok(Some(n as u64))
    };
    Ok(ImageStats {
        observations: count("observations")?,
        session_summaries: count("session_summaries")?,
        user_prompts: count("user_prompts")?,
        table_names: table_names.clone(),
    })
}

/// The digest in a `.sha256` file as the old tool writes it (`<hex>  name`),
/// or a bare digest; `None` if it holds no 64-digit hex digest.
pub fn parse_sha256_file(text: &str) -> Option<String> {
    let first = text.split_whitespace().next()?.to_ascii_lowercase();
    (first.len() == 64 && first.bytes().all(|b| b.is_ascii_hexdigit())).then_some(first)
}

/// A file path as the path part of an SQLite `file:` URI: every byte that
/// is not unreserved or `/` is percent-encoded (`?`, `#`, `%`, spaces...).
pub(crate) fn uri_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    let mut s = String::new();
    for &b in abs.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_paths_are_escaped() {
        assert_eq!(
            uri_path(Path::new("/a b/c?d#e%.db")),
            "/a%20b/c%3Fd%23e%25.db"
        );
    }

    #[test]
    fn missing_counts_are_omitted_and_tables_is_a_count() {
        let m = LegacyManifest {
            project: "p".into(),
            canonical_id: "c".into(),
            timestamp: "t".into(),
            source_host: "h".into(),
            db_size: 1,
            sha256: "s".into(),
            observations: Some(3),
            session_summaries: None,
            user_prompts: None,
            tables: 1,
            table_names: vec!["observations".into()],
            membridge_txid: None,
        };
        let v: serde_json::Value = serde_json::to_value(&m).unwrap();
        assert_eq!(v["observations"], 3);
        assert!(v.get("session_summaries").is_none());
        assert_eq!(v["tables"], 1);
    }

    #[test]
    fn image_is_read_without_sidecars() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("odd name?.db");
        {
            let c = rusqlite::Connection::open(&p).unwrap();
            c.execute_batch(
                "PRAGMA journal_mode=WAL; CREATE TABLE observations(x); \
                 INSERT INTO observations VALUES (1),(2);",
            )
            .unwrap();
        }
        let before: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(before.len(), 1, "closing removed the -wal");
        let s = image_stats(&p).unwrap();
        assert_eq!(s.observations, Some(2));
        assert_eq!(s.user_prompts, None);
        assert_eq!(s.table_names, vec!["observations".to_string()]);
        let after: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(after.len(), 1, "no sidecar was created");
    }
}
