//! Divergent history: transactions this node acknowledged that the bucket's
//! history will never contain, because another node took over before they
//! were published. They are never dropped silently and never uploaded: the
//! database as it stood at this node's head is written under
//! `<state dir>/divergent/` with a JSON report beside it, the journal marks
//! them set aside (no longer backlog, and this history may not be continued),
//! and `status` and `doctor` show the reports until `membridge merge` brings
//! the rows into the new primary's history or the user dismisses them
//! ([`super::aside`]).
//!
//! Two ways in: a running primary that is fenced ([`super::node::Node::fence`]),
//! and a daemon that starts with unpublished transactions the bucket has
//! moved past ([`diverged`], judged by [`judge`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::manifest::{self, hex64, Manifest};
use crate::journal::{DbHead, Journal};
use crate::remote::{Layout, ObjectStore};

/// What `divergent/<name>.json` says about `divergent/<name>.db`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub database: String,
    pub node: String,
    /// The epoch the set-aside transactions were written under (the newest).
    pub epoch: u64,
    /// The bucket's epoch when they were set aside, if known.
    pub bucket_epoch: Option<u64>,
    pub reason: String,
    /// The last txid of this node's history that the bucket has.
    pub published_txid: u64,
    pub local_head_txid: u64,
    /// First and last txid set aside.
    pub unpublished_txids: [u64; 2],
    pub unpublished_count: u64,
    /// When the first and the last of them committed (RFC 3339).
    pub first_commit_at: Option<String>,
    pub last_commit_at: Option<String>,
    /// Whole-database checksum of the copy, hex.
    pub local_checksum: String,
    /// The database at `local_head_txid`; open it with `sqlite3`.
    pub copy: Option<String>,
    pub copy_error: Option<String>,
    pub created_at: String,
}

/// `<state dir>/divergent`.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("divergent")
}

/// The reports under `<state dir>/divergent/`, by name (oldest first within
/// a database: names carry the time they were written).
pub fn reports(state_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir(state_dir))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    out.sort();
    out
}

fn read(path: &Path) -> Option<Report> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms).map(|t| t.to_rfc3339())
}

/// What [`judge`] needs to know of this node beyond the database's head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Local {
    /// This node's post-checksum at the bucket's head txid when that txid is
    /// among its unpublished ones (an upload whose answer was lost).
    pub own_post: Option<u64>,
    /// [`Journal::parent`].
    pub parent: Option<u64>,
    /// The newest epoch this node held ([`Journal::last_epoch`]).
    pub epoch: u64,
}

/// Why `h`'s unpublished transactions (`(txid, epoch, commit ms)`, in order)
/// can never be published to the bucket whose manifest is `m`; `None` while
/// they still can (this node, primary again, continues the bucket's head).
pub fn judge(
    m: &Manifest,
    h: &DbHead,
    unpublished: &[(u64, u64, i64)],
    local: Local,
) -> Option<String> {
    // A new generation not uploaded yet has no transaction rows: its head is
    // its snapshot (the file as this node found it, changes made outside
    // membridge included), judged by the generation rule below.
    let new_generation = unpublished.is_empty() && h.head_txid > h.uploaded_txid;
    let first = match unpublished.first() {
        Some((t, _, _)) => *t,
        None if new_generation => h.head_txid,
        None => return None,
    };
    let Some(d) = m.databases.get(&h.name) else {
        // The bucket has no history of it. Publishable still, unless another
        // primary's epoch began since this node's last: that node holds the
        // lease without them (and may start its own history), so they would
        // stay a backlog nobody uploads and nobody is told about.
        if m.epoch <= local.epoch {
            return None;
        }
        return Some(format!(
            "the bucket has no history of {} and is at epoch {} (another primary), newer than this node's epoch {} (txid {first} on)",
            h.name, m.epoch, local.epoch
        ));
    };
    if d.generation != h.generation {
        if on_top(h, local.parent, d) {
            return None; // this node's new generation, on top of the bucket's
        }
        return Some(format!(
            "the bucket's history of {} is generation {} at txid {}, this node's generation {}",
            h.name, d.generation, d.head_txid, h.generation
        ));
    }
    for (txid, epoch, _) in unpublished {
        if let Some(e) = m.epoch_of(&h.name, *txid).filter(|e| e > epoch) {
            return Some(format!(
                "txid {txid} belongs to epoch {e} in the bucket (another primary); this node wrote it under epoch {epoch}"
            ));
        }
    }
    if d.head_txid > h.uploaded_txid {
        let ours = d.head_txid <= h.head_txid
            && local.own_post.is_some()
            && local.own_post == manifest::parse_hex64(&d.head_checksum);
        if !ours {
            return Some(format!(
                "the bucket's head of {} is txid {}, written by another node after this node's txid {}",
                h.name, d.head_txid, h.uploaded_txid
            ));
        }
    }
    None
}

/// Whether `h`, a generation this node started from its own file (the file
/// and the journal disagreed: changed outside membridge, say), continues the
/// bucket's history `d`: it replaced a history whose head was exactly the
/// bucket's head (same generation, txid and checksum). Txids of different
/// generations say nothing about each other (issue 11, item 4: a node that
/// restarted history from a stale copy must not replace a newer history).
pub fn on_top(h: &DbHead, parent: Option<u64>, d: &manifest::DbManifest) -> bool {
    h.generation == d.generation + 1
        && h.base_txid == d.head_txid + 1
        && parent.is_some()
        && parent == manifest::parse_hex64(&d.head_checksum)
}

/// The databases whose unpublished transactions the bucket has moved past,
/// with the reason and the bucket's epoch. Reads the manifest once.
pub async fn diverged(
    store: &dyn ObjectStore,
    layout: &Layout,
    canonical_id: &str,
    journal: &Journal,
) -> Result<Vec<(DbHead, String, u64)>, String> {
    let mut pending = Vec::new();
    for h in journal.heads().map_err(|e| e.to_string())? {
        let after = h.uploaded_txid.max(
            journal
                .divergent_through(&h.name)
                .ok()
                .flatten()
                .unwrap_or(0),
        );
        if h.head_txid > after {
            pending.push((h, after));
        }
    }
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let Some(v) = manifest::load(store, layout, canonical_id)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (h, after) in pending {
        let times = journal
            .txn_times(&h.name, after, h.head_txid)
            .map_err(|e| e.to_string())?;
        let bucket_head = v.manifest.databases.get(&h.name).map(|d| d.head_txid);
        let own_post = match bucket_head {
            Some(t) if t > h.uploaded_txid && t <= h.head_txid => journal
                .txns(&h.name, t - 1, t, 0)
                .map_err(|e| e.to_string())?
                .first()
                .map(|x| x.post_checksum),
            _ => None,
        };
        let local = Local {
            own_post,
            parent: journal.parent(&h.name).map_err(|e| e.to_string())?,
            epoch: journal.last_epoch().map_err(|e| e.to_string())?,
        };
        if let Some(why) = judge(&v.manifest, &h, &times, local) {
            out.push((h, why, v.manifest.epoch));
        }
    }
    Ok(out)
}

/// Writes `h`'s database at its head and the report under `divergent_dir`,
/// and marks its transactions set aside in the journal. Once per head: a
/// report already written for the same head and checksum is returned as is.
/// A copy that cannot be made is said in the report, never hidden.
pub fn set_aside(
    journal: &Journal,
    base_dir: &Path,
    divergent_dir: &Path,
    h: &DbHead,
    node: &str,
    bucket_epoch: Option<u64>,
    reason: &str,
) -> PathBuf {
    let checksum = hex64(h.head_checksum);
    let existing = std::fs::read_dir(divergent_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .find(|p| {
            read(p).is_some_and(|r| {
                r.database == h.name
                    && r.local_head_txid == h.head_txid
                    && r.local_checksum == checksum
            })
        });
    let after = h.uploaded_txid.max(
        journal
            .divergent_through(&h.name)
            .ok()
            .flatten()
            .unwrap_or(0),
    );
    if let Err(e) = journal.mark_divergent(&h.name, h.head_txid) {
        tracing::error!(db = %h.name, error = %e, "cannot mark divergent transactions in the journal");
    }
    if let Some(path) = existing {
        return path;
    }
    let times = journal
        .txn_times(&h.name, after, h.head_txid)
        .unwrap_or_default();
    let epoch = times.iter().map(|t| t.1).max().unwrap_or(0);
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let stem = format!("{}-epoch{epoch}-{stamp}", h.name.replace('/', "%2F"));
    let copy = divergent_dir.join(format!("{stem}.db"));
    let made = std::fs::create_dir_all(divergent_dir)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            crate::journal::base::materialize(journal, base_dir, h, h.head_txid, &copy)
                .map_err(|e| e.to_string())
        });
    let report = Report {
        database: h.name.clone(),
        node: node.to_string(),
        epoch,
        bucket_epoch,
        reason: reason.to_string(),
        published_txid: h.uploaded_txid,
        local_head_txid: h.head_txid,
        unpublished_txids: [after + 1, h.head_txid],
        unpublished_count: h.head_txid.saturating_sub(after),
        first_commit_at: times.first().and_then(|t| rfc3339(t.2)),
        last_commit_at: times.last().and_then(|t| rfc3339(t.2)),
        local_checksum: checksum,
        copy: made.as_ref().ok().map(|_| copy.display().to_string()),
        copy_error: made.as_ref().err().cloned(),
        created_at: chrono::Utc::now().to_rfc3339(),
    };
    let path = divergent_dir.join(format!("{stem}.json"));
    let body = serde_json::to_vec_pretty(&report).expect("report serializes");
    if let Err(e) = std::fs::write(&path, body) {
        tracing::error!(report = %path.display(), error = %e, "cannot write the divergent report");
    }
    tracing::warn!(
        db = %h.name,
        transactions = report.unpublished_count,
        txids = ?report.unpublished_txids,
        copy = %copy.display(),
        report = %path.display(),
        reason,
        "transactions the bucket's history does not have are set aside: they will not be uploaded; review the copy"
    );
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::manifest::{DbManifest, EpochStart};

    const DB: &str = "claude-mem.db";

    fn head(generation: u64, uploaded: u64, head: u64) -> DbHead {
        DbHead {
            name: DB.into(),
            page_size: 4096,
            generation,
            head_txid: head,
            head_checksum: 7,
            size_pages: 1,
            uploaded_txid: uploaded,
            base_txid: 0,
        }
    }

    /// The bucket at `head` (checksum 0x10 + head), with epochs starting at
    /// the given txids.
    fn bucket(head: u64, epochs: &[(u64, u64)]) -> Manifest {
        let mut m = Manifest::new("c", "n", epochs.last().map_or(1, |e| e.0));
        m.databases.insert(
            DB.into(),
            DbManifest {
                generation: 1,
                head_txid: head,
                head_checksum: hex64(0x10 + head),
                page_size: 4096,
                size_pages: 1,
                snapshot: None,
                older_snapshots: vec![],
            },
        );
        m.epochs = epochs
            .iter()
            .map(|(e, start)| EpochStart {
                epoch: *e,
                start_txid: [(DB.to_string(), *start)].into(),
            })
            .collect();
        m
    }

    fn txns(range: std::ops::RangeInclusive<u64>, epoch: u64) -> Vec<(u64, u64, i64)> {
        range.map(|t| (t, epoch, 1000 * t as i64)).collect()
    }

    #[test]
    fn still_publishable() {
        // This node was the last primary: the bucket is where it left it.
        let m = bucket(20, &[(1, 1)]);
        assert_eq!(
            judge(&m, &head(1, 20, 25), &txns(21..=25, 1), Local::default()),
            None
        );
        // Its own later epoch already started after its head.
        let m = bucket(20, &[(1, 1), (2, 26)]);
        assert_eq!(
            judge(&m, &head(1, 20, 25), &txns(21..=25, 1), Local::default()),
            None
        );
        // The bucket got txid 22 from this node, the answer was lost.
        let m = bucket(22, &[(1, 1)]);
        let own = Some(0x10 + 22);
        assert_eq!(
            judge(
                &m,
                &head(1, 20, 25),
                &txns(21..=25, 1),
                Local {
                    own_post: own,
                    ..Local::default()
                }
            ),
            None
        );
        // Nothing unpublished, or a database the bucket does not know (at
        // the epoch they were written under).
        assert_eq!(judge(&m, &head(1, 25, 25), &[], Local::default()), None);
        let mut other = head(1, 0, 3);
        other.name = "other.db".into();
        let own_epoch = Local {
            epoch: 1,
            ..Local::default()
        };
        assert_eq!(judge(&m, &other, &txns(1..=3, 1), own_epoch), None);
    }

    #[test]
    fn moved_past() {
        // Another node took over at epoch 2 right after this node's txid 20.
        let m = bucket(20, &[(1, 1), (2, 21)]);
        let why = judge(&m, &head(1, 20, 25), &txns(21..=25, 1), Local::default()).unwrap();
        assert!(why.contains("epoch 2"), "{why}");
        // ... and published its own txid 22 (no epoch history: an old manifest).
        let m = bucket(22, &[]);
        let why = judge(
            &m,
            &head(1, 20, 25),
            &txns(21..=25, 1),
            Local {
                own_post: Some(1),
                ..Local::default()
            },
        )
        .unwrap();
        assert!(why.contains("another node"), "{why}");
        // The bucket does not know the database, but another primary took
        // over after these were written (found by the model-based test: a
        // node killed before its first upload kept them as a backlog forever).
        let mut other = head(1, 0, 3);
        other.name = "other.db".into();
        let m2 = bucket(0, &[(1, 1), (2, 1)]);
        let own_epoch = Local {
            epoch: 1,
            ..Local::default()
        };
        let why = judge(&m2, &other, &txns(1..=3, 1), own_epoch).unwrap();
        assert!(why.contains("epoch 2"), "{why}");
        // ... unless this node took the lease again itself since (its own
        // newer epoch): then they are still its to publish.
        let again = Local {
            epoch: 2,
            ..Local::default()
        };
        assert_eq!(judge(&m2, &other, &txns(1..=3, 1), again), None);
        // The bucket restarted history (a new generation elsewhere).
        let mut m = bucket(30, &[]);
        m.databases.get_mut(DB).unwrap().generation = 2;
        assert!(judge(&m, &head(1, 20, 25), &txns(21..=25, 1), Local::default()).is_some());
    }

    /// Issue 11, item 4: a generation this node started from its own file
    /// continues the bucket only on top of exactly the head it replaced;
    /// txids of two generations say nothing about each other.
    fn parent(p: Option<u64>) -> Local {
        Local {
            parent: p,
            ..Local::default()
        }
    }

    #[test]
    fn a_new_local_generation_continues_only_the_head_it_replaced() {
        let m = bucket(25, &[(1, 1)]);
        let mut h = head(2, 0, 27);
        h.base_txid = 26;
        let t = txns(27..=27, 1);
        assert_eq!(judge(&m, &h, &t, parent(Some(0x10 + 25))), None);
        assert!(
            judge(&m, &h, &t, parent(Some(0x99))).is_some(),
            "another state at txid 25"
        );
        assert!(
            judge(&m, &h, &t, Local::default()).is_some(),
            "no parent recorded"
        );
        // The bucket is elsewhere: a number past its head proves nothing.
        let m = bucket(24, &[(1, 1)]);
        assert!(judge(&m, &h, &t, parent(Some(0x10 + 24))).is_some());
    }

    #[test]
    fn set_aside_writes_once_and_marks_the_journal() {
        use bytes::Bytes;
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("journal.db")).unwrap();
        let base_dir = dir.path().join("base");
        std::fs::create_dir_all(&base_dir).unwrap();
        std::fs::write(
            crate::journal::base::base_path(&base_dir, DB, 0),
            vec![0u8; 4096],
        )
        .unwrap();
        let mut h = head(1, 0, 0);
        h.head_checksum = crate::sqlite::checksum::PageHashes::from_bytes(&[0u8; 4096], 4096)
            .unwrap()
            .checksum();
        j.start_generation(&h).unwrap();
        let mut hashes =
            crate::sqlite::checksum::PageHashes::from_bytes(&[0u8; 4096], 4096).unwrap();
        for t in 1..=3u64 {
            let page = Bytes::from(vec![t as u8; 4096]);
            let pre = hashes.checksum();
            let post = hashes.apply([(1, page.as_ref())], 1).unwrap();
            j.append(
                DB,
                &crate::journal::Txn {
                    txid: t,
                    epoch: 1,
                    db_size_pages: 1,
                    pre_checksum: pre,
                    post_checksum: post,
                    timestamp_ms: 1_700_000_000_000 + t as i64,
                    pages: vec![(1, page)],
                },
            )
            .unwrap();
        }
        j.mark_uploaded(DB, 1).unwrap();
        let h = j.head(DB).unwrap().unwrap();
        let out = dir.path().join("divergent");
        let p = set_aside(&j, &base_dir, &out, &h, "n1", Some(2), "test");
        let r = read(&p).unwrap();
        assert_eq!(r.unpublished_txids, [2, 3]);
        assert_eq!(r.unpublished_count, 2);
        assert_eq!(r.epoch, 1);
        assert!(r
            .first_commit_at
            .unwrap()
            .starts_with("2023-11-14T22:13:20.002"));
        let copy = std::fs::read(r.copy.unwrap()).unwrap();
        assert!(
            copy == vec![3u8; 4096],
            "the copy is the database at the head"
        );
        assert_eq!(j.backlog(DB).unwrap().0, 0, "set aside: no backlog");
        // Again for the same head: the same report, nothing new.
        assert_eq!(
            set_aside(&j, &base_dir, &out, &h, "n1", Some(2), "again"),
            p
        );
        assert_eq!(reports(dir.path()), [p]);
    }
}
