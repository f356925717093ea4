//! The daemon's live state, published as `.membridge/status.json`.
//!
//! Every component updates its part of one document; the filesystem renders it
//! on open, so `cat .membridge/status.json` always shows one consistent state.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::fs::virt::VirtualFiles;
use crate::metrics::Metrics;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DbStatus {
    pub head_txid: u64,
    pub uploaded_txid: u64,
    pub applied_txid: u64,
    pub backlog: u64,
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
    pub io: crate::fs::iomode::IoDoc,
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
    io: Arc<crate::fs::iomode::IoStats>,
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
    pub fn io(&self) -> &Arc<crate::fs::iomode::IoStats> {
        &self.io
    }

    /// The daemon's Prometheus counters (see [`crate::metrics`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

impl VirtualFiles for Status {
    fn names(&self) -> &'static [&'static str] {
        &["status.json", "primary"]
    }

    fn content(&self, name: &str) -> Option<Vec<u8>> {
        let doc = self.snapshot();
        match name {
            "status.json" => {
                let mut v = serde_json::to_vec_pretty(&doc).ok()?;
                v.push(b'\n');
                Some(v)
            }
            "primary" => {
                let p = match &doc.primary {
                    Some(p) if *p != doc.node_id => format!("{p}\n"),
                    _ => String::new(),
                };
                Some(p.into_bytes())
            }
            _ => None,
        }
    }
}

/// `membridge status` without `--json`: the fields an operator looks at first.
pub fn render_text(d: &StatusDoc) -> String {
    let mut s = format!(
        "mount:     {} ({}, pid {})\nnode:      {}\nproject:   {}\nrole:      {} (policy {})\nprimary:   {}\nepoch:     {}\n",
        d.mount_dir,
        d.state,
        d.pid,
        d.node_id,
        d.canonical_id,
        d.role,
        d.policy,
        d.primary.as_deref().unwrap_or("-"),
        d.epoch.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
    );
    for (name, db) in &d.databases {
        s += &format!(
            "db {name}: head {} uploaded {} applied {} backlog {} lag {}\n",
            db.head_txid,
            db.uploaded_txid,
            db.applied_txid,
            db.backlog,
            db.lag_seconds
                .map(|l| format!("{l:.1}s"))
                .unwrap_or_else(|| "-".into())
        );
        if let Some(h) = &db.hydration {
            s += &format!(
                "   local {}/{} pages ({:.0}%){}\n",
                h.pages_local,
                h.pages_total,
                h.pages_local as f64 * 100.0 / h.pages_total.max(1) as f64,
                match (h.done, h.verified) {
                    (_, true) => ", hydrated and verified",
                    (true, false) => ", hydrated",
                    _ => ", hydrating",
                },
            );
        }
        if let Some(rate) = db.cache_hit_rate() {
            s += &format!(
                "   read-through: {} fetches, cache hit rate {:.0}%\n",
                db.read_through_fetches,
                rate * 100.0
            );
        }
        if db.refused_writes > 0 {
            s += &format!(
                "   refused {} write transaction(s) of clients here, the last at {} (not the primary: writes go to {})\n",
                db.refused_writes,
                db.last_refused.as_deref().unwrap_or("-"),
                d.primary.as_deref().unwrap_or("the primary"),
            );
        }
        if let Some(e) = &db.last_error {
            s += &format!("   last error: {e}\n");
        }
    }
    if let Some(e) = &d.last_error {
        s += &format!("last error: {e}\n");
    }
    if let Some(l) = &d.legacy {
        s += &format!(
            "legacy:    sqlite/claude-mem.db written by {}{} at {}{}{}\n",
            l.written_by.as_deref().unwrap_or("?"),
            if l.by_membridge {
                ""
            } else {
                " (the old tool)"
            },
            l.written_at.as_deref().unwrap_or("?"),
            l.txid.map(|t| format!(", txid {t}")).unwrap_or_default(),
            l.age_seconds
                .map(|a| format!(
                    ", {a:.0}s behind (refreshed within {} s of a change)",
                    l.refresh_seconds
                ))
                .unwrap_or_default(),
        );
    }
    for c in &d.coexistence {
        s += &format!("old tool:  {c}\n");
    }
    for r in &d.divergent {
        s += &format!("divergent: {r} (never uploaded; see membridge doctor)\n");
        let copy = std::fs::read(r)
            .ok()
            .and_then(|b| serde_json::from_slice::<crate::replica::divergent::Report>(&b).ok())
            .and_then(|r| r.copy);
        if let Some(copy) = copy {
            s += &format!("   bring it back: membridge merge {copy}   (or: membridge merge --dismiss {copy})\n");
        }
    }
    for c in &d.replaced {
        s += &format!(
            "set aside: {c} (this node's database before the bucket's copy replaced it)\n   \
             bring it back: membridge merge {c}   (or: membridge merge --dismiss {c})\n"
        );
    }
    s
}
