//! Living beside the old tool (docs/ARCHITECTURE.md, "Living beside the old
//! tool"): nodes still running `sqlite_minio_sync.py` share the bucket with
//! membridge until every machine has moved, and may come back after a
//! rollback. What the old tool does there, and what membridge does about it:
//!
//! - **Its lease.** The old tool takes a lease it finds expired (or absent)
//!   with a plain put of 3,600 s whenever its `PRIMARY_NODE_ID` names itself;
//!   it never renews through membridge's conditional writes and publishes no
//!   heartbeat. [`old_tool_holder`] recognises such a lease, `doctor` and
//!   `status` name it, and `leadership select NODE --force` replaces it by
//!   compare-and-swap on its ETag ([`crate::lease::LeaseClient::select_force`]).
//! - **Its copy.** While `sqlite/` exists the primary keeps it at most
//!   `MEMBRIDGE_LEGACY_REFRESH_S` (60 s) behind its uploaded head
//!   ([`LegacyWatch`]). A copy the old tool wrote itself (no membridge mark in
//!   `sqlite/manifest.json`, and not the snapshot `migrate` adopted) is kept
//!   aside before it is replaced: its rows may exist nowhere else.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::journal::Journal;
use crate::lease::{Lease, DEFAULT_HEARTBEAT_INTERVAL};
use crate::remote::{Layout, ObjectStore, StoreError};
use crate::replica::legacy::{self, LegacyManifestFields, LEGACY_DB};
use crate::status::{LegacyStatus, Status};

pub use crate::lease::oldtool::{
    old_tool_holder, written_by_old_tool, OLD_TOOL_LEASE_SECONDS, OLD_TOOL_POLICY,
};

/// What `doctor` and `status` say about a lease an old-tool node holds, with
/// what to do. `node` is this node, suggested as the one to select.
pub fn describe_old_holder(lease: &Lease, now: DateTime<Utc>, node: &str) -> String {
    let who = &lease.primary_node_id;
    let left = lease.remaining(now).num_seconds();
    if left >= 0 {
        format!(
            "the lease is held by {who}, an old-tool node that publishes no membridge history \
             (epoch {}, {left} s left of its {} s): every membridge node is read-only until it \
             expires; on {who}, remove the old tool's hooks (or set PRIMARY_NODE_ID there to the \
             membridge primary), then `membridge leadership select {node} --force` \
             (docs/MIGRATION.md, \"Old-tool nodes and the lease\")",
            lease.epoch, lease.lease_seconds
        )
    } else {
        format!(
            "the lease names {who}, an old-tool node, and expired {} s ago: a membridge node \
             takes it at epoch {}; while {who} runs the old tool with PRIMARY_NODE_ID={who}, its \
             next push, pull, doctor or leadership_info takes it back for {} s",
            -left,
            lease.epoch + 1,
            OLD_TOOL_LEASE_SECONDS
        )
    }
}

/// `sqlite/manifest.json` as read, with its ETag.
#[derive(Debug, Clone)]
pub struct LegacySeen {
    pub etag: String,
    pub fields: LegacyManifestFields,
}

/// The old tool's manifest, if the legacy layout is kept (`None`: there is
/// no `sqlite/manifest.json`). An unreadable one counts as the old tool's.
pub async fn read_legacy(
    store: &dyn ObjectStore,
    layout: &Layout,
) -> Result<Option<LegacySeen>, StoreError> {
    let key = layout.legacy_manifest();
    match store.get(&key).await {
        Ok(got) => Ok(Some(LegacySeen {
            etag: got.etag,
            fields: legacy::read_manifest(&key, &got.body).unwrap_or_default(),
        })),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the legacy copy is one membridge must not lose: written by the
/// old tool, and not the snapshot `migrate` adopted (`adopted_sha`).
pub fn is_foreign(fields: &LegacyManifestFields, adopted_sha: Option<&str>) -> bool {
    !fields.by_membridge && fields.sha256.as_deref() != adopted_sha
}

/// Whether the old tool wrote the legacy copy after membridge last moved its
/// head (`manifest_updated_at`): a rollback, or an old-tool push beside it.
pub fn newer_than_head(fields: &LegacyManifestFields, manifest_updated_at: &str) -> bool {
    let parse = |s: &str| DateTime::parse_from_rfc3339(s).ok();
    match (
        fields.timestamp.as_deref().and_then(parse),
        parse(manifest_updated_at),
    ) {
        (Some(l), Some(m)) => !fields.by_membridge && l > m,
        _ => false,
    }
}

/// `<state dir>/legacy/`: reports of old-tool copies kept aside.
pub fn reports_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("legacy")
}

/// One old-tool copy of `sqlite/claude-mem.db` membridge kept before
/// replacing it (`<state dir>/legacy/<utc>-<sha>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForeignReport {
    pub key: String,
    pub sha256: String,
    pub source_host: Option<String>,
    pub timestamp: Option<String>,
    /// The copy, under `replaced/` (merged or dismissed like any set-aside copy).
    pub copy: String,
    pub noticed_at: String,
    pub noticed_by: String,
    pub what_to_do: String,
}

/// Every report, oldest first.
pub fn reports(state_dir: &Path) -> Vec<(PathBuf, ForeignReport)> {
    let mut out: Vec<(PathBuf, ForeignReport)> = std::fs::read_dir(reports_dir(state_dir))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| {
            let r = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
            Some((p, r))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Whether a kept copy still waits for the operator (no `.resolved` sidecar).
fn outstanding(r: &ForeignReport) -> bool {
    let mut p = std::ffi::OsString::from(&r.copy);
    p.push(".resolved");
    Path::new(&r.copy).exists() && !Path::new(&p).exists()
}

/// The sentence `status` and `doctor` show for an outstanding kept copy.
pub fn describe_foreign(r: &ForeignReport) -> String {
    format!(
        "the old tool ({}) overwrote sqlite/claude-mem.db at {} while membridge kept it (an \
         old-tool node with LEADERSHIP_ENABLED=0 or ALLOW_SECONDARY_PUSH=1?); its snapshot \
         is kept as {}: `membridge merge {}` on the primary brings its rows in \
         (`membridge merge --dismiss {}` if they are not wanted)",
        r.source_host.as_deref().unwrap_or("unknown host"),
        r.timestamp.as_deref().unwrap_or("an unknown time"),
        r.copy,
        r.copy,
        r.copy
    )
}

/// The daemon's watch over the old tool: names an old-tool lease holder,
/// keeps old-tool copies aside, and on the primary keeps `sqlite/` fresh.
pub struct LegacyWatch {
    pub store: Arc<dyn ObjectStore>,
    pub layout: Layout,
    pub project_id: String,
    pub canonical_id: String,
    pub node_id: String,
    pub journal: Arc<Journal>,
    pub base_dir: PathBuf,
    pub state_dir: PathBuf,
    pub status: Status,
    /// Whether this node publishes now (primary).
    pub is_primary: Box<dyn Fn() -> bool + Send + Sync>,
    /// `MEMBRIDGE_LEGACY_REFRESH_S`.
    pub refresh: Duration,
}

/// What one round of [`LegacyWatch`] remembers for the next.
#[derive(Default)]
struct Memory {
    last_publish: Option<Instant>,
    behind_since: Option<Instant>,
}

impl LegacyWatch {
    /// Rounds at a quarter of the refresh interval (0.25 s to 5 s), until the
    /// process ends. Failures are logged and retried at the next round.
    pub async fn run(self) {
        let tick = (self.refresh / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        let mut mem = Memory::default();
        loop {
            if let Err(e) = self.round(&mut mem).await {
                tracing::debug!(error = %e, "legacy watch: will try again");
            }
            tokio::time::sleep(tick).await;
        }
    }

    async fn round(&self, mem: &mut Memory) -> Result<(), String> {
        let now = Utc::now();
        let mut notes = Vec::new();
        let lease_key = self.layout.lease();
        if let Ok(got) = self.store.get(&lease_key).await {
            if let Ok(lease) = Lease::parse(&lease_key, &got.body, &self.canonical_id) {
                if lease.remaining(now).num_seconds() >= 0
                    && old_tool_holder(self.store.as_ref(), &self.layout, &lease, now)
                        .await
                        .unwrap_or(false)
                {
                    notes.push(describe_old_holder(&lease, now, &self.node_id));
                }
            }
        }
        let seen = read_legacy(self.store.as_ref(), &self.layout)
            .await
            .map_err(|e| e.to_string())?;
        let mut legacy_status = None;
        if let Some(seen) = &seen {
            let adopted = crate::replica::manifest::load(
                self.store.as_ref(),
                &self.layout,
                &self.canonical_id,
            )
            .await
            .ok()
            .flatten()
            .and_then(|v| v.manifest.adopted.map(|a| a.sha256));
            let foreign = is_foreign(&seen.fields, adopted.as_deref());
            // Not replaced before it is kept: its rows may exist nowhere else.
            let kept = !foreign || self.keep_foreign(&seen.fields).await?;
            // The snapshot migrate adopted is membridge's first (txid 0).
            let legacy_txid = match &seen.fields {
                f if f.by_membridge => f.membridge_txid,
                f if f.sha256.is_some() && f.sha256.as_deref() == adopted.as_deref() => {
                    Some(crate::migrate::SEED_TXID)
                }
                _ => None,
            };
            let head = self.journal.head(LEGACY_DB).ok().flatten();
            let target = head.as_ref().map(|h| h.uploaded_txid);
            let behind = match (target, legacy_txid) {
                (Some(t), Some(l)) => t > l,
                (Some(_), None) => true,
                (None, _) => false,
            };
            let primary = (self.is_primary)();
            if behind && primary {
                mem.behind_since.get_or_insert_with(Instant::now);
            } else {
                mem.behind_since = None;
            }
            let due = mem.last_publish.is_none_or(|t| t.elapsed() >= self.refresh) || foreign;
            let mut written = seen.fields.clone();
            written.membridge_txid = legacy_txid;
            if behind && primary && due && kept {
                if let Some(h) = head.filter(|h| h.page_size > 0) {
                    let txid = h.uploaded_txid;
                    if self.publish(&h, txid, &seen.etag).await? {
                        mem.last_publish = Some(Instant::now());
                        mem.behind_since = None;
                        written.by_membridge = true;
                        written.membridge_txid = Some(txid);
                        written.source_host = Some(self.node_id.clone());
                        written.timestamp = Some(Utc::now().to_rfc3339());
                    }
                }
            }
            legacy_status = Some(LegacyStatus {
                written_at: written.timestamp.clone(),
                written_by: written.source_host.clone(),
                by_membridge: written.by_membridge,
                txid: written.membridge_txid,
                age_seconds: mem.behind_since.map(|t| t.elapsed().as_secs_f64()),
                refresh_seconds: self.refresh.as_secs(),
            });
        }
        for (_, r) in reports(&self.state_dir) {
            if outstanding(&r) {
                notes.push(describe_foreign(&r));
            }
        }
        self.status.update(|s| {
            s.legacy = legacy_status;
            s.coexistence = notes;
        });
        Ok(())
    }

    /// The image of `h` at `txid`, built from the base image and the journal
    /// (never by reading the live database), published as the old tool's copy.
    /// `Ok(false)`: not published, because `sqlite/manifest.json` is no
    /// longer at `etag` (the old tool pushed since it was read; the next
    /// round keeps that copy first). Plain puts cannot close this window
    /// entirely; it is as long as the upload.
    async fn publish(
        &self,
        h: &crate::journal::DbHead,
        txid: u64,
        etag: &str,
    ) -> Result<bool, String> {
        let dir = reports_dir(&self.state_dir);
        let out = dir.join("refresh.db");
        let (journal, base_dir, h2, out2) = (
            self.journal.clone(),
            self.base_dir.clone(),
            h.clone(),
            out.clone(),
        );
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(out2.parent().expect("has a parent"))
                .map_err(|e| e.to_string())?;
            crate::journal::base::materialize(&journal, &base_dir, &h2, txid, &out2)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        let current = read_legacy(self.store.as_ref(), &self.layout)
            .await
            .map_err(|e| e.to_string())?;
        if current.is_some_and(|c| c.etag != etag) {
            let _ = std::fs::remove_file(&out);
            return Ok(false);
        }
        let res = legacy::publish_legacy_at(
            self.store.as_ref(),
            &self.layout,
            &self.project_id,
            &self.canonical_id,
            &self.node_id,
            &out,
            Some(txid),
        )
        .await
        .map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&out);
        res?;
        tracing::info!(
            txid,
            "legacy copy sqlite/claude-mem.db refreshed for old-tool nodes"
        );
        Ok(true)
    }

    /// Keeps the old tool's copy under `replaced/` with a report under
    /// `legacy/`, once per snapshot. `Ok(false)` if it is not whole yet (the
    /// old tool's push is under way: its digest does not match).
    async fn keep_foreign(&self, fields: &LegacyManifestFields) -> Result<bool, String> {
        let Some(sha) = fields.sha256.clone() else {
            return Ok(false);
        };
        if reports(&self.state_dir)
            .iter()
            .any(|(_, r)| r.sha256 == sha)
        {
            return Ok(true);
        }
        let got = match self.store.get(&self.layout.legacy_db()).await {
            Ok(g) => g,
            Err(StoreError::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e.to_string()),
        };
        use sha2::Digest;
        if hex::encode(sha2::Sha256::digest(&got.body)) != sha {
            return Ok(false);
        }
        let now = Utc::now();
        let stamp = now.format("%Y%m%dT%H%M%SZ");
        let copy = crate::replica::aside::replaced_dir(&self.state_dir)
            .join(format!("{LEGACY_DB}-{stamp}"));
        let report_path = reports_dir(&self.state_dir).join(format!("{stamp}-{}.json", &sha[..16]));
        let report = ForeignReport {
            key: self.layout.legacy_db(),
            sha256: sha.clone(),
            source_host: fields.source_host.clone(),
            timestamp: fields.timestamp.clone(),
            copy: copy.display().to_string(),
            noticed_at: now.to_rfc3339(),
            noticed_by: self.node_id.clone(),
            what_to_do: format!(
                "membridge merge {} on the primary, or membridge merge --dismiss {}",
                copy.display(),
                copy.display()
            ),
        };
        let body = got.body.clone();
        let (c2, r2) = (copy.clone(), report_path.clone());
        let json = serde_json::to_vec_pretty(&report).expect("a report serializes");
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(c2.parent().expect("has a parent"))?;
            std::fs::create_dir_all(r2.parent().expect("has a parent"))?;
            let tmp = c2.with_extension("tmp");
            std::fs::write(&tmp, &body)?;
            std::fs::rename(&tmp, &c2)?;
            std::fs::write(&r2, json)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        tracing::warn!(
            source_host = fields.source_host.as_deref().unwrap_or("?"),
            timestamp = fields.timestamp.as_deref().unwrap_or("?"),
            copy = %copy.display(),
            report = %report_path.display(),
            "the old tool overwrote sqlite/claude-mem.db: its snapshot is kept aside before \
             membridge replaces it; `membridge merge` it on the primary"
        );
        Ok(true)
    }
}

/// What `migrate --rollback` did in the bucket.
#[derive(Debug, Clone)]
pub struct RolledBack {
    /// The txid of `claude-mem.db` the legacy copy now holds.
    pub txid: u64,
    pub sha256: String,
    /// The lease written for the old tool.
    pub lease: Lease,
    /// The other machines known to membridge (by their heartbeats).
    pub others: Vec<String>,
}

/// `migrate --rollback`, the bucket's part (the caller has published and
/// unmounted this node first): the head of `claude-mem.db` becomes the old
/// tool's copy, and a lease the old tool accepts names `to` for an hour.
/// `state_dir`: where the restored image is kept.
pub async fn rollback_bucket(
    lease: &crate::lease::LeaseSettings,
    project_id: &str,
    state_dir: &Path,
    store: Arc<dyn ObjectStore>,
    to: &str,
) -> Result<RolledBack, String> {
    let layout = Layout::new(&lease.canonical_id);
    let client = crate::lease::LeaseClient::new(lease, store.clone());
    let store = store.as_ref();
    // Refuse before anything changes while a membridge primary still runs.
    if let Some(v) = client.read().await.map_err(|e| e.to_string())? {
        let now = Utc::now();
        if client.seen_held(&v.lease, now)
            && !old_tool_holder(store, &layout, &v.lease, now)
                .await
                .map_err(|e| e.to_string())?
        {
            return Err(format!(
                "{} holds the lease as a membridge primary: run the rollback there, or unmount it first",
                v.lease.describe()
            ));
        }
    }
    let dir = reports_dir(state_dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let image = dir.join("rollback.db");
    let _ = std::fs::remove_file(&image);
    let r = crate::replica::restore::restore(
        store,
        &layout,
        &lease.canonical_id,
        LEGACY_DB,
        crate::replica::restore::Target::Latest,
        &image,
        false,
    )
    .await
    .map_err(|e| format!("restoring the head of {LEGACY_DB}: {e}"))?;
    let published = legacy::publish_legacy_at(
        store,
        &layout,
        project_id,
        &lease.canonical_id,
        &lease.node_id,
        &image,
        Some(r.txid),
    )
    .await
    .map_err(|e| e.to_string());
    let _ = std::fs::remove_file(&image);
    let published = published?;
    let lease = client
        .hand_to_old_tool(to, OLD_TOOL_LEASE_SECONDS)
        .await
        .map_err(|e| e.to_string())?
        .lease;
    let mut others: Vec<String> =
        crate::lease::list_nodes(store, &layout, DEFAULT_HEARTBEAT_INTERVAL, Utc::now())
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter_map(|n| n.heartbeat.ok().map(|h| h.node_id))
            .filter(|n| n != to)
            .collect();
    others.sort();
    others.dedup();
    Ok(RolledBack {
        txid: r.txid,
        sha256: published.manifest.sha256,
        lease,
        others,
    })
}

/// The old tool's settings for each machine after a rollback to `to`
/// (what the real script reads: `MEMBRIDGE_NODE_ID` or the host name is its
/// node id; it renews an expired lease only where `PRIMARY_NODE_ID` names
/// itself; `LEADERSHIP_ENABLED=0` and `ALLOW_SECONDARY_PUSH=1` let a node
/// push over the primary's copy).
pub fn rollback_settings(to: &str, others: &[String], local_is_head: bool) -> String {
    let common = format!(
        "PRIMARY_NODE_ID={to}  LEADERSHIP_ENABLED=1 (or unset)  ALLOW_SECONDARY_PUSH unset"
    );
    let mut s = format!(
        "on {to} (the old tool's primary): `membridge unmount` if still mounted; in ~/.claude-mem-minio/config.env: \
         {common}  MEMBRIDGE_NODE_ID={to} unless that is its host name; put the old SessionStart/Stop hooks back; {}\n",
        if local_is_head {
            "its claude-mem.db is the head already".to_string()
        } else {
            "fetch the head once: ALLOW_PRIMARY_PULL_OVERRIDE=1 python3 sqlite_minio_sync.py pull_sqlite".to_string()
        }
    );
    for o in others {
        s += &format!(
            "on {o}: `membridge unmount`; in ~/.claude-mem-minio/config.env: {common}  MEMBRIDGE_NODE_ID={o} unless that is its host name; put the old hooks back; then `python3 sqlite_minio_sync.py pull_sqlite` (cm-pull)\n"
        );
    }
    s += "on any other old-tool machine: the same settings as the line above; never PRIMARY_NODE_ID naming itself\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(policy: &str, extra: serde_json::Value) -> Lease {
        let mut v = serde_json::json!({
            "canonical_id": "c", "primary_node_id": "OLD1", "issued_at": 1,
            "expires_at": 3601, "lease_seconds": 3600, "epoch": 2,
            "policy": policy, "issued_by": "OLD1"
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        Lease::parse("l", &serde_json::to_vec(&v).unwrap(), "c").unwrap()
    }

    #[test]
    fn only_the_old_tools_own_leases_count_as_written_by_it() {
        assert!(written_by_old_tool(&lease(
            OLD_TOOL_POLICY,
            serde_json::json!({})
        )));
        // membridge's: its policy, or a session, or released.
        assert!(!written_by_old_tool(&lease("auto", serde_json::json!({}))));
        assert!(!written_by_old_tool(&lease(
            OLD_TOOL_POLICY,
            serde_json::json!({"membridge_session": "s"})
        )));
        assert!(!written_by_old_tool(&lease(
            OLD_TOOL_POLICY,
            serde_json::json!({"released_by": "m1"})
        )));
    }

    #[test]
    fn foreign_and_newer_copies() {
        let old = LegacyManifestFields {
            sha256: Some("aa".into()),
            timestamp: Some("2026-02-25T10:11:12.123456+00:00".into()),
            ..Default::default()
        };
        assert!(is_foreign(&old, None));
        assert!(!is_foreign(&old, Some("aa")), "the adopted snapshot");
        let ours = LegacyManifestFields {
            by_membridge: true,
            ..old.clone()
        };
        assert!(!is_foreign(&ours, None));
        assert!(newer_than_head(&old, "2026-02-25T10:00:00+00:00"));
        assert!(!newer_than_head(&old, "2026-02-25T11:00:00Z"));
        assert!(!newer_than_head(&ours, "2026-02-25T10:00:00+00:00"));
        assert!(!newer_than_head(&old, "not a time"));
    }

    #[test]
    fn old_tool_temp_files_are_recognised() {
        use crate::fs::class::is_old_tool_temp;
        use std::ffi::OsStr;
        assert!(is_old_tool_temp(OsStr::new("tmpab12_x9.db.tmp")));
        assert!(is_old_tool_temp(OsStr::new("tmpq0w9e8.snap.db")));
        assert!(!is_old_tool_temp(OsStr::new("claude-mem.db")));
        assert!(!is_old_tool_temp(OsStr::new("claude-mem.db.tmp")));
        assert!(!is_old_tool_temp(OsStr::new("tmp.log")));
    }
}
