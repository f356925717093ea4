//! The bucket layout (docs/FORMAT.md). Every key of a project lives under
//! `projects/<canonical_id>/`; this is the one place that spells them, so that the
//! lease, the uploader, the follower, `doctor` and `migrate` cannot disagree.
//!
//! Txids are written as 16 lowercase hex digits so that a plain lexicographic
//! listing returns segments and snapshots in txid order.

use chrono::{DateTime, Utc};

/// Database name used by the old tool's whole-file snapshots.
pub const LEGACY_DB_NAME: &str = "claude-mem.db";

/// The keys of one project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

/// A segment key parsed back: the transactions `from..=to` of database `db`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentKey {
    pub db: String,
    pub from: u64,
    pub to: u64,
}

/// A snapshot key parsed back: the full image of `db` at `txid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotKey {
    pub db: String,
    pub txid: u64,
}

impl Layout {
    pub fn new(canonical_id: &str) -> Layout {
        Layout {
            prefix: format!("projects/{canonical_id}/"),
        }
    }

    /// `projects/<canonical_id>/`, with the trailing slash.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// `leadership/lease.json`: changed only by conditional writes.
    pub fn lease(&self) -> String {
        self.key("leadership/lease.json")
    }

    pub fn audit_prefix(&self) -> String {
        self.key("leadership/audit/")
    }

    /// `leadership/audit/<YYYYmmddTHHMMSSZ>-<node>.json`, the old tool's spelling
    /// (including its replacement of `/` and `:` in the node id).
    pub fn audit_entry(&self, at: DateTime<Utc>, node_id: &str) -> String {
        let safe = node_id.replace(['/', ':'], "_");
        self.key(&format!(
            "leadership/audit/{}-{safe}.json",
            at.format("%Y%m%dT%H%M%SZ")
        ))
    }

    /// `leadership/handover.json`: a request to the primary to hand the lease
    /// over (`membridge leadership select`); plain put, deleted once honoured.
    pub fn handover(&self) -> String {
        self.key("leadership/handover.json")
    }

    pub fn nodes_prefix(&self) -> String {
        self.key("nodes/")
    }

    /// `nodes/<node_id>.json`: the node's heartbeat.
    pub fn node(&self, node_id: &str) -> String {
        self.key(&format!("nodes/{node_id}.json"))
    }

    /// `manifest.json`: epoch and per-database head; advanced by CAS only.
    pub fn manifest(&self) -> String {
        self.key("manifest.json")
    }

    /// `db/<name>/`: everything replicated for one database.
    pub fn db_prefix(&self, db: &str) -> String {
        self.key(&format!("db/{db}/"))
    }

    pub fn segment_prefix(&self, db: &str) -> String {
        self.key(&format!("db/{db}/seg/"))
    }

    /// `db/<name>/seg/<from:016x>-<to:016x>.seg`.
    pub fn segment(&self, db: &str, from: u64, to: u64) -> String {
        self.key(&format!("db/{db}/seg/{from:016x}-{to:016x}.seg"))
    }

    pub fn snapshot_prefix(&self, db: &str) -> String {
        self.key(&format!("db/{db}/snap/"))
    }

    /// `db/<name>/snap/<txid:016x>.snap`.
    pub fn snapshot(&self, db: &str, txid: u64) -> String {
        self.key(&format!("db/{db}/snap/{txid:016x}.snap"))
    }

    /// `files/`: versions of replicated files (`MEMBRIDGE_REPLICATE_FILES`).
    pub fn files_prefix(&self) -> String {
        self.key("files/")
    }

    /// `files/<name>/<sha256>`: one version of a replicated file, addressed by
    /// its content, so a create-only put of the same bytes is idempotent. The
    /// manifest's `files` map says which version is current.
    pub fn file_version(&self, name: &str, sha256: &str) -> String {
        self.key(&format!("files/{name}/{sha256}"))
    }

    /// `sqlite/`: the old tool's files, kept up to date for nodes not yet migrated.
    pub fn legacy_prefix(&self) -> String {
        self.key("sqlite/")
    }

    /// `sqlite/claude-mem.db`: a whole, plain SQLite file.
    pub fn legacy_db(&self) -> String {
        self.key(&format!("sqlite/{LEGACY_DB_NAME}"))
    }

    /// `sqlite/claude-mem.db.sha256`: hex digest of [`Layout::legacy_db`].
    pub fn legacy_sha256(&self) -> String {
        self.key(&format!("sqlite/{LEGACY_DB_NAME}.sha256"))
    }

    /// `sqlite/manifest.json`: the old tool's metadata (host, timestamp, counts);
    /// not to be confused with membridge's own [`Layout::manifest`].
    pub fn legacy_manifest(&self) -> String {
        self.key("sqlite/manifest.json")
    }

    /// `locks/active.lock`: the old tool's best-effort push lock.
    pub fn legacy_lock(&self) -> String {
        self.key("locks/active.lock")
    }

    /// `.doctor/`: throwaway probe objects written and deleted by `doctor`.
    pub fn doctor_probe(&self, token: &str) -> String {
        self.key(&format!(".doctor/{token}"))
    }

    /// Parses a full segment key of this project; `None` for anything else.
    pub fn parse_segment(&self, key: &str) -> Option<SegmentKey> {
        let (db, file) = self.split_db_key(key, "/seg/")?;
        let (from, to) = file.strip_suffix(".seg")?.split_once('-')?;
        let (from, to) = (parse_txid(from)?, parse_txid(to)?);
        (from <= to).then_some(SegmentKey { db, from, to })
    }

    /// Parses a full snapshot key of this project; `None` for anything else.
    pub fn parse_snapshot(&self, key: &str) -> Option<SnapshotKey> {
        let (db, file) = self.split_db_key(key, "/snap/")?;
        let txid = parse_txid(file.strip_suffix(".snap")?)?;
        Some(SnapshotKey { db, txid })
    }

    /// `<prefix>db/<name><kind><file>` → (name, file). The name may contain `/`
    /// (a database in a subdirectory), so the split is on the last `kind`.
    fn split_db_key<'k>(&self, key: &'k str, kind: &str) -> Option<(String, &'k str)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix("db/")?;
        let (db, file) = rest.rsplit_once(kind)?;
        let db_ok = !db.is_empty() && db.split('/').all(|c| !c.is_empty() && c != "..");
        (db_ok && !file.contains('/')).then(|| (db.to_string(), file))
    }
}

/// Exactly 16 lowercase hex digits, as written by [`Layout::segment`].
fn parse_txid(s: &str) -> Option<u64> {
    let ok = s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        u64::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn keys_follow_the_design_layout() {
        let l = Layout::new("2a97516c354b6884");
        let p = "projects/2a97516c354b6884/";
        assert_eq!(l.prefix(), p);
        assert_eq!(l.lease(), format!("{p}leadership/lease.json"));
        assert_eq!(l.node("n1"), format!("{p}nodes/n1.json"));
        assert_eq!(l.handover(), format!("{p}leadership/handover.json"));
        assert_eq!(l.manifest(), format!("{p}manifest.json"));
        assert_eq!(
            l.segment("claude-mem.db", 1, 0x2a),
            format!("{p}db/claude-mem.db/seg/0000000000000001-000000000000002a.seg")
        );
        assert_eq!(
            l.snapshot("claude-mem.db", 255),
            format!("{p}db/claude-mem.db/snap/00000000000000ff.snap")
        );
        assert_eq!(
            l.file_version(".cwd-remap-applied-v1", "ab12"),
            format!("{p}files/.cwd-remap-applied-v1/ab12")
        );
        assert!(l
            .file_version("modes/x.json", "ab")
            .starts_with(&l.files_prefix()));
        assert_eq!(l.legacy_db(), format!("{p}sqlite/claude-mem.db"));
        assert_eq!(l.legacy_sha256(), format!("{p}sqlite/claude-mem.db.sha256"));
        assert_eq!(l.legacy_manifest(), format!("{p}sqlite/manifest.json"));
        let at = Utc.with_ymd_and_hms(2026, 2, 3, 4, 5, 6).unwrap();
        assert_eq!(
            l.audit_entry(at, "host:1/x"),
            format!("{p}leadership/audit/20260203T040506Z-host_1_x.json")
        );
    }

    #[test]
    fn segment_and_snapshot_keys_round_trip() {
        let l = Layout::new("abc");
        for db in ["claude-mem.db", "sub/dir/x.sqlite3", "a/seg/b.db"] {
            let k = l.segment(db, 7, u64::MAX);
            let want = SegmentKey {
                db: db.into(),
                from: 7,
                to: u64::MAX,
            };
            assert_eq!(l.parse_segment(&k), Some(want), "{k}");
            let s = l.snapshot(db, 9);
            let want = SnapshotKey {
                db: db.into(),
                txid: 9,
            };
            assert_eq!(l.parse_snapshot(&s), Some(want), "{s}");
            assert_eq!(l.parse_snapshot(&k), None);
            assert_eq!(l.parse_segment(&s), None);
        }
    }

    #[test]
    fn foreign_or_malformed_keys_are_not_parsed() {
        let l = Layout::new("abc");
        let other = Layout::new("abd");
        let good = l.segment("x.db", 1, 2);
        assert!(other.parse_segment(&good).is_none());
        let p = l.prefix();
        for bad in [
            format!("{p}db/x.db/seg/0000000000000002-0000000000000001.seg"), // from > to
            format!("{p}db/x.db/seg/1-2.seg"),
            format!("{p}db/x.db/seg/000000000000000A-000000000000000B.seg"),
            format!("{p}db/x.db/seg/0000000000000001-0000000000000002.seg.tmp"),
            format!("{p}db/x.db/seg/0000000000000001-0000000000000002"),
            format!("{p}db//seg/0000000000000001-0000000000000002.seg"),
            format!("{p}db/../seg/0000000000000001-0000000000000002.seg"),
            format!("{p}db/x.db/seg/extra/0000000000000001-0000000000000002.seg"),
            format!("{p}x.db/seg/0000000000000001-0000000000000002.seg"),
        ] {
            assert!(l.parse_segment(&bad).is_none(), "{bad}");
        }
        assert!(l
            .parse_snapshot(&format!("{p}db/x.db/snap/+000000000000001.snap"))
            .is_none());
    }

    #[test]
    fn hex_txids_sort_like_numbers() {
        let l = Layout::new("abc");
        let mut keys: Vec<String> = [300u64, 2, 0x1_0000_0000, 17]
            .iter()
            .map(|t| l.snapshot("d", *t))
            .collect();
        keys.sort();
        let txids: Vec<u64> = keys
            .iter()
            .map(|k| l.parse_snapshot(k).unwrap().txid)
            .collect();
        assert_eq!(txids, vec![2, 17, 300, 0x1_0000_0000]);
    }
}
