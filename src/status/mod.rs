//! The daemon's live state and its counters, published as
//! `.membridge/status.json` and at `/metrics`.
//!
//! Every component updates its part of one document ([`StatusDoc`]) and bumps
//! its counters ([`Metrics`]); this module only keeps them. Rendering is above
//! it: [`crate::report`] (`status.json`, the `primary` file, the text of
//! `membridge status`) and [`crate::metrics`] (Prometheus). Nothing here
//! imports either, so the state is a leaf every component can depend on.
//!
//! The replication fields of a database (`head_txid`, `uploaded_txid`,
//! `backlog`, `applied_txid`, `lag_seconds`) mean different things by role, so
//! they are written only through the methods named for what happened
//! ([`Status::journaled`], [`Status::published`], [`Status::bucket_head`],
//! [`Status::applied`], ...), never by `update`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

pub(crate) mod counters;
pub mod io;

pub use counters::{Metrics, Object};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DbStatus {
    /// A primary: the newest txid in its journal ([`Status::journaled`],
    /// [`Status::committed`]). A secondary: the bucket's head
    /// ([`Status::bucket_head`]).
    pub head_txid: u64,
    /// The newest txid this node published ([`Status::published`],
    /// [`Status::snapshot_published`], or read from its journal).
    pub uploaded_txid: u64,
    /// A secondary: the newest txid applied locally ([`Status::applied`]).
    pub applied_txid: u64,
    /// A primary: committed transactions not in the bucket yet.
    pub backlog: u64,
    /// A secondary: how far behind the bucket's head ([`Status::applied`]).
    pub lag_seconds: Option<f64>,
    pub last_upload: Option<String>,
    pub last_error: Option<String>,
    /// A secondary serving the database before it is whole locally.
    #[serde(default)]
    pub hydration: Option<HydrationStatus>,
    /// Range reads made to answer reads of pages not local yet.
    #[serde(default)]
    pub read_through_fetches: u64,
    /// Frames those reads found in the read-through cache instead.
    #[serde(default)]
    pub cache_hits: u64,
    /// Write transactions of clients refused because this node is not the
    /// primary (docs/ARCHITECTURE.md, "The view on a secondary"), and when
    /// the last one was: what a user's client could not write here.
    #[serde(default)]
    pub refused_writes: u64,
    #[serde(default)]
    pub last_refused: Option<String>,
}

impl DbStatus {
    pub fn cache_hit_rate(&self) -> Option<f64> {
        let all = self.read_through_fetches + self.cache_hits;
        (all > 0).then(|| self.cache_hits as f64 / all as f64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HydrationStatus {
    pub pages_total: u64,
    pub pages_local: u64,
    pub done: bool,
    /// The whole file was hashed against the head's checksum.
    #[serde(default)]
    pub verified: bool,
    pub snapshot: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusDoc {
    pub version: String,
    pub pid: u32,
    pub node_id: String,
    pub canonical_id: String,
    pub mount_dir: String,
    pub started_at: String,
    /// "starting" until the mount serves requests, then "ready".
    pub state: String,
    pub role: String,
    pub policy: String,
    pub epoch: Option<u64>,
    pub primary: Option<String>,
    pub classes: ClassGlobsDoc,
    pub databases: BTreeMap<String, DbStatus>,
    pub log_file: Option<String>,
    /// "ok", "unreachable" (bucket down: writes go on, backlog grows) or "error".
    pub upload_state: String,
    /// The last bucket outage; `to` is empty while it lasts.
    pub last_outage: Option<Outage>,
    /// Reports of divergent copies kept when this node was fenced, until
    /// merged or dismissed (`replica::aside`).
    #[serde(default)]
    pub divergent: Vec<String>,
    /// This node's own databases the bucket's copy replaced (under
    /// `replaced/` in the state dir), until merged or dismissed.
    #[serde(default)]
    pub replaced: Vec<String>,
    pub last_error: Option<String>,
    /// The last role changes, oldest first (at most [`ROLE_HISTORY`]).
    #[serde(default)]
    pub role_history: Vec<RoleChange>,
    /// Kernel passthrough and the I/O the daemon served (filled in when
    /// the document is read: the counters live in the filesystem).
    #[serde(default)]
    pub io: io::IoDoc,
    /// The old tool's copy (`sqlite/`) as this node last saw or wrote it,
    /// while the legacy layout is kept (docs/ARCHITECTURE.md, "Living beside
    /// the old tool").
    #[serde(default)]
    pub legacy: Option<LegacyStatus>,
    /// What the old tool is doing to this project that needs the operator:
    /// a lease held by an old-tool node, a legacy copy it overwrote. Each a
    /// sentence with what to do; `doctor` says DEGRADED while any is listed.
    #[serde(default)]
    pub coexistence: Vec<String>,
}

/// `sqlite/claude-mem.db` as last seen by this node.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct LegacyStatus {
    /// When the copy in the bucket was written (its manifest's `timestamp`).
    pub written_at: Option<String>,
    /// Who wrote it (`source_host`), and whether that was membridge.
    pub written_by: Option<String>,
    pub by_membridge: bool,
    /// The txid of `claude-mem.db` it holds, when membridge wrote it.
    pub txid: Option<u64>,
    /// Seconds the copy is behind this node's head (0: current), when known.
    pub age_seconds: Option<f64>,
    /// The bound on that age: refreshed this long after a change at most.
    pub refresh_seconds: u64,
}

/// How many role changes `status.json` keeps.
pub const ROLE_HISTORY: usize = 20;

/// One role change and why it happened ("lease released", "lease lost: ...").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoleChange {
    pub at: String,
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outage {
    pub from: String,
    pub to: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassGlobsDoc {
    pub replicated_databases: Vec<String>,
    pub replicated_files: Vec<String>,
    pub local: String,
}

/// Who this node is and how it is set up: what `status.json` opens with
/// (the daemon fills it in from the configuration).
#[derive(Debug, Clone)]
pub struct Identity {
    pub node_id: String,
    pub canonical_id: String,
    pub mount_dir: String,
    /// The role the configuration gives before the lease says more.
    pub role: String,
    /// The lease policy's name.
    pub policy: String,
    /// The primary the configuration names, if it names one.
    pub primary: Option<String>,
    pub classes: ClassGlobsDoc,
    pub log_file: Option<String>,
}

/// The live document, and the counters that `/metrics` serves beside it.
#[derive(Clone)]
pub struct Status {
    doc: Arc<RwLock<StatusDoc>>,
    metrics: Arc<Metrics>,
    io: Arc<io::IoStats>,
}

impl Status {
    pub fn new(id: Identity) -> Status {
        Status::from_doc(StatusDoc {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            node_id: id.node_id,
            canonical_id: id.canonical_id,
            mount_dir: id.mount_dir,
            started_at: chrono::Utc::now().to_rfc3339(),
            state: "starting".into(),
            role: id.role,
            policy: id.policy,
            epoch: None,
            primary: id.primary,
            classes: id.classes,
            databases: BTreeMap::new(),
            log_file: id.log_file,
            upload_state: "ok".into(),
            last_outage: None,
            divergent: Vec::new(),
            replaced: Vec::new(),
            last_error: None,
            role_history: Vec::new(),
            io: Default::default(),
            legacy: None,
            coexistence: Vec::new(),
        })
    }

    /// A document for unit tests that drive components without a Config.
    #[cfg(test)]
    pub(crate) fn for_tests(node_id: &str) -> Status {
        Status::from_doc(StatusDoc {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            node_id: node_id.into(),
            canonical_id: "test".into(),
            mount_dir: "/test".into(),
            started_at: chrono::Utc::now().to_rfc3339(),
            state: "ready".into(),
            role: "secondary".into(),
            policy: "auto".into(),
            epoch: None,
            primary: None,
            classes: ClassGlobsDoc {
                replicated_databases: vec![],
                replicated_files: vec![],
                local: String::new(),
            },
            databases: BTreeMap::new(),
            log_file: None,
            upload_state: "ok".into(),
            last_outage: None,
            divergent: Vec::new(),
            replaced: Vec::new(),
            last_error: None,
            role_history: Vec::new(),
            io: Default::default(),
            legacy: None,
            coexistence: Vec::new(),
        })
    }

    pub fn from_doc(doc: StatusDoc) -> Status {
        Status {
            doc: Arc::new(RwLock::new(doc)),
            metrics: Arc::new(Metrics::default()),
            io: Arc::default(),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut StatusDoc)) {
        f(&mut self.doc.write().unwrap());
    }

    pub fn snapshot(&self) -> StatusDoc {
        let mut doc = self.doc.read().unwrap().clone();
        doc.io = self.io.doc();
        doc
    }

    /// The filesystem's passthrough state and I/O counters.
    pub fn io(&self) -> &Arc<io::IoStats> {
        &self.io
    }

    /// The daemon's counters (rendered by [`crate::metrics`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn db(&self, db: &str, f: impl FnOnce(&mut DbStatus)) {
        f(self
            .doc
            .write()
            .unwrap()
            .databases
            .entry(db.to_string())
            .or_default());
    }

    /// A primary: its journal holds `db` up to `head`, of which `uploaded` is
    /// in the bucket and `backlog` transactions are not (read from the
    /// journal, which is the truth of all three).
    pub fn journaled(&self, db: &str, head: u64, uploaded: u64, backlog: u64) {
        self.db(db, |d| {
            d.head_txid = head;
            d.uploaded_txid = uploaded;
            d.backlog = backlog;
        });
    }

    /// A primary committed `db` up to `head`; the journal knew it published
    /// up to `uploaded` when capture started (status may know more since).
    /// Txids are consecutive: what is not uploaded is the backlog.
    pub fn committed(&self, db: &str, head: u64, uploaded: u64) {
        self.db(db, |d| {
            d.head_txid = head;
            d.uploaded_txid = d.uploaded_txid.max(uploaded);
            d.backlog = head.saturating_sub(d.uploaded_txid);
        });
    }

    /// This node published a segment of `db` up to `txid`.
    pub fn published(&self, db: &str, txid: u64) {
        self.db(db, |d| {
            d.uploaded_txid = txid;
            d.last_upload = Some(chrono::Utc::now().to_rfc3339());
            d.last_error = None;
        });
    }

    /// This node published a snapshot of `db` at `txid` (at or below what its
    /// segments published, unless it starts a generation).
    pub fn snapshot_published(&self, db: &str, txid: u64) {
        self.db(db, |d| {
            d.uploaded_txid = d.uploaded_txid.max(txid);
            d.last_upload = Some(chrono::Utc::now().to_rfc3339());
        });
    }

    /// A secondary saw the bucket's head of `db` at `txid`.
    pub fn bucket_head(&self, db: &str, txid: u64) {
        self.db(db, |d| d.head_txid = txid);
    }

    /// A secondary applied `db` up to `txid`; `committed_ms`: when the
    /// bucket's head was committed, if known (the lag is measured from it).
    pub fn applied(&self, db: &str, txid: u64, committed_ms: Option<i64>) {
        let now = chrono::Utc::now().timestamp_millis();
        self.db(db, |d| {
            d.applied_txid = txid;
            d.lag_seconds = if d.head_txid <= txid {
                Some(0.0)
            } else {
                committed_ms.map(|c| (now - c).max(0) as f64 / 1000.0)
            };
        });
    }
}
