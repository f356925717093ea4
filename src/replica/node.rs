//! The node's role, and what it means for the replicated paths.
//!
//! Only a primary writes replicated databases: its writes pass through and are
//! captured. On any other role the database is still the WAL database it is
//! (docs/ARCHITECTURE.md, "The view on a secondary"): readers open it, read
//! and share its `-shm` as usual, and the daemon's view applier commits the
//! primary's transactions into it. Everyone else may *begin* a write
//! transaction (claude-mem's worker runs dozens of `INSERT OR IGNORE` that
//! change nothing at every start, and dies if one is refused), but the first
//! frame written to the `-wal` or page to the database is refused: SQLite
//! reports it as "disk I/O error", the only code WAL mode has for a refused
//! write (a read-only `-wal` would say "readonly" but refuse the no-op
//! transactions too). A rollback-mode client is refused at its journal
//! instead, which SQLite reports as "attempt to write a readonly database".
//! Each refusal is logged once per transaction with the primary's name.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use crate::fs::class::{PathClass, Sidecar};
use crate::fs::{Invalidator, Replication};
use crate::status::Status;

use super::apply::Applier;
use super::capture::Capture;
use super::hydrate::ReadThrough;
use super::roles::Lifecycle;
pub use super::roles::Role;

/// Where the follower stands on one database: the bucket's head it last saw
/// and the txid its view is at (applied or verified).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct View {
    pub head_txid: u64,
    pub applied_txid: u64,
}

/// The follower's progress, per database it has seen in the manifest. Owned
/// by the node: the take-over and the set-aside checker decide from it;
/// `status.json` only shows it.
#[derive(Default)]
pub struct Views {
    dbs: Mutex<BTreeMap<String, View>>,
}

impl Views {
    /// The follower read `db`'s head in the manifest.
    pub fn saw_head(&self, db: &str, head_txid: u64) {
        self.dbs
            .lock()
            .unwrap()
            .entry(db.to_string())
            .or_default()
            .head_txid = head_txid;
    }

    /// The follower's view of `db` is at `txid`.
    pub fn applied(&self, db: &str, txid: u64) {
        self.dbs
            .lock()
            .unwrap()
            .entry(db.to_string())
            .or_default()
            .applied_txid = txid;
    }

    /// Every database the follower has seen, by name.
    pub fn all(&self) -> Vec<(String, View)> {
        let dbs = self.dbs.lock().unwrap();
        dbs.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Where the follower stands on `db`, if it has seen it at all.
    pub fn get(&self, db: &str) -> Option<View> {
        self.dbs.lock().unwrap().get(db).copied()
    }
}

pub struct Node {
    capture: Arc<Capture>,
    /// The role and its history: decided in `super::roles`.
    life: Lifecycle,
    /// The follower's progress (what the take-over waits for).
    views: Views,
    status: Status,
    /// Pages of a secondary's databases not local yet come from here.
    read_through: std::sync::OnceLock<Arc<ReadThrough>>,
    /// Drops the kernel's cached pages of files changed behind its back.
    invalidator: std::sync::OnceLock<Arc<Invalidator>>,
    /// Commits the primary's transactions into this node's view.
    applier: std::sync::OnceLock<Arc<Applier>>,
    /// Wakes the follower before its next poll is due (a promotion waits on
    /// the old primary's last transactions).
    poke: Notify,
}

impl Node {
    pub fn new(node_id: &str, capture: Arc<Capture>, role: Role, status: Status) -> Node {
        let life = Lifecycle::new(node_id, role, status.clone());
        // Clients the kernel serves are stopped and let go with the role
        // (src/replica/tail/); the last commits they made are captured.
        let c = capture.clone();
        life.on_writers(Box::new(move |on| match on {
            true => c.tails().start_writers(),
            false => c.tails().stop_writers(&|db| {
                if let Err(e) = c.tail(db) {
                    tracing::error!(db, error = %e, "capturing the last commits from the WAL failed");
                }
            }),
        }));
        Node {
            capture,
            life,
            views: Views::default(),
            status,
            read_through: std::sync::OnceLock::new(),
            invalidator: std::sync::OnceLock::new(),
            applier: std::sync::OnceLock::new(),
            poke: Notify::new(),
        }
    }

    /// The lifecycle state (role, tenure, history, lease holder).
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.life
    }

    /// The follower's progress per database.
    pub fn views(&self) -> &Views {
        &self.views
    }

    /// Asks the follower to look at the bucket now rather than at its next poll.
    pub fn poll_now(&self) {
        self.poke.notify_one();
    }

    /// Resolves when [`Node::poll_now`] was called (since the last time).
    pub async fn poll_requested(&self) {
        self.poke.notified().await
    }

    /// Notified at every role change.
    pub fn role_changes(&self) -> Arc<Notify> {
        self.life.changes()
    }

    /// The last transaction captured in this run of the daemon.
    pub fn last_write(&self) -> Option<DateTime<Utc>> {
        self.capture.last_commit()
    }

    /// When this node became primary, while it is.
    pub fn primary_since(&self) -> Option<DateTime<Utc>> {
        self.life.primary_since()
    }

    /// Why this primary is not idle for `idle` (policy `follow`), if it is not.
    pub fn busy(&self, idle: Duration) -> Option<String> {
        crate::lease::busy_reason(self.last_write(), self.primary_since(), idle, Utc::now())
    }

    pub fn role(&self) -> Role {
        self.life.role()
    }

    pub fn set_role(&self, role: Role) {
        self.life.set(role, "");
    }

    /// Changes the role; `reason` goes to the log and to the role history in
    /// `status.json` (a release and a loss of the lease must read differently).
    pub fn set_role_for(&self, role: Role, reason: &str) {
        self.life.set(role, reason);
    }

    fn primary(&self) -> bool {
        self.role() == Role::Primary
    }

    /// Whether writes that reach the files are captured: on the primary, and
    /// while it hands over (a write let through just before the gate closed
    /// is still its to publish; no new one gets through).
    fn captures(&self) -> bool {
        self.role().publishes()
    }

    fn refuse(&self, class: &PathClass) -> i32 {
        if let PathClass::File(name) = class {
            // Only the primary's versions travel (src/replica/files.rs).
            tracing::info!(
                file = %name,
                role = self.role().name(),
                "refused a write to a replicated file: this node is not the primary"
            );
        }
        // One line per refused transaction: SQLite gives up at the journal.
        if let PathClass::Sidecar(db, Sidecar::Journal | Sidecar::Wal) = class {
            let primary = self.life.holder().unwrap_or_else(|| "unknown".into());
            tracing::info!(
                db = %db,
                role = self.role().name(),
                primary = %primary,
                "refused a write transaction: this node is not the primary"
            );
            self.status.update(|s| {
                let d = s.databases.entry(db.clone()).or_default();
                d.refused_writes += 1;
                d.last_refused = Some(chrono::Utc::now().to_rfc3339());
            });
        }
        libc::EACCES
    }
}

impl Node {
    pub fn capture(&self) -> &Capture {
        &self.capture
    }

    pub fn capture_handle(&self) -> Arc<Capture> {
        self.capture.clone()
    }

    pub fn set_invalidator(&self, inval: Arc<Invalidator>) {
        let _ = self.invalidator.set(inval);
    }

    pub fn invalidator(&self) -> Option<&Arc<Invalidator>> {
        self.invalidator.get()
    }

    pub fn set_applier(&self, applier: Arc<Applier>) {
        let _ = self.applier.set(applier);
    }

    pub fn applier(&self) -> Option<&Arc<Applier>> {
        self.applier.get()
    }

    /// Before this node takes writes on `db`: the view's WAL is checkpointed
    /// and emptied, the primary's page 1 written back, and the daemon's own
    /// connection closed, so the backing file is exactly the bucket's head
    /// (what [`Capture::adopt`] checks) and capture starts on an empty WAL.
    /// `Ok(false)` when the view of `db` was not in use: nothing changed.
    pub fn settle_view(&self, db: &str) -> Result<bool, String> {
        let Some(a) = self.applier.get() else {
            return Ok(false);
        };
        let res = a.settle(db).map_err(|e| e.to_string());
        let _ = a.close(Some(db));
        if let Some(inval) = self.invalidator.get() {
            inval.invalidate(db, &[]);
        }
        res
    }

    /// A token naming where `db`'s view stands when a set-aside copy may be
    /// compared with it (`super::aside::ViewAt`): on the primary, its last
    /// capture; on a secondary, the head once the follower applied it and
    /// the file is whole locally. None in between (catching up, fenced,
    /// handing over, behind, hydrating).
    pub fn view_at_head(&self, db: &str) -> Option<String> {
        match self.role() {
            Role::Primary => Some(format!(
                "p{}",
                self.last_write().map_or(0, |t| t.timestamp_micros())
            )),
            Role::Secondary => {
                let v = self.views.get(db)?;
                let whole = self.read_through.get().is_none_or(|r| {
                    matches!(
                        r.state(db),
                        super::hydrate::State::None | super::hydrate::State::Complete
                    )
                });
                (whole && v.applied_txid == v.head_txid).then(|| format!("s{}", v.applied_txid))
            }
            _ => None,
        }
    }

    pub fn set_read_through(&self, rt: Arc<ReadThrough>) {
        let _ = self.read_through.set(rt);
    }

    /// Whether every database is whole locally (a node still hydrating
    /// cannot become primary: its file is not the bucket's head yet).
    pub fn all_local(&self) -> bool {
        self.read_through.get().is_none_or(|r| r.all_local())
    }
}

impl Node {
    fn is_applier(&self, pid: u32) -> bool {
        self.applier.get().is_some_and(|a| a.is_applier(pid))
    }
}

impl Replication for Node {
    fn check_write(&self, class: &PathClass, pid: u32) -> Result<(), i32> {
        match class {
            PathClass::Local => Ok(()),
            _ if self.primary() => Ok(()),
            // Every reader writes its read marks into the wal-index.
            PathClass::Sidecar(_, Sidecar::Shm) => Ok(()),
            PathClass::Database(_) | PathClass::Sidecar(..) if self.is_applier(pid) => Ok(()),
            _ => Err(self.refuse(class)),
        }
    }

    // A reader in WAL mode needs the -wal to exist; after a demotion (or a
    // primary's last close, which deletes it) nobody but a writer would
    // create it. An empty -wal changes nothing (docs/ARCHITECTURE.md, "The
    // view on a secondary").
    fn check_create(&self, class: &PathClass, pid: u32) -> Result<(), i32> {
        match class {
            PathClass::Sidecar(_, Sidecar::Wal) => Ok(()),
            _ => self.check_write(class, pid),
        }
    }

    fn before_write(&self, class: &PathClass, offset: u64, len: u64) -> Result<(), i32> {
        match (class, self.read_through.get()) {
            (PathClass::Database(db), Some(rt)) if !self.primary() => {
                rt.claim(db, offset, len);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    // Capture runs on the primary only (and while it hands over): on any
    // other role the writes that get through are the view applier's, already
    // in the bucket.
    fn written(&self, class: &PathClass, offset: u64, len: u64) -> Result<(), i32> {
        if !self.captures() {
            return Ok(());
        }
        self.capture.written(class, offset, len)
    }

    fn truncated(&self, class: &PathClass, len: u64) -> Result<(), i32> {
        if !self.captures() {
            return Ok(());
        }
        self.capture.truncated(class, len)
    }

    fn removed(&self, class: &PathClass) -> Result<(), i32> {
        if !self.captures() {
            return Ok(());
        }
        self.capture.removed(class)
    }

    fn replaced(&self, class: &PathClass) -> Result<(), i32> {
        if !self.captures() {
            return Ok(());
        }
        self.capture.replaced(class)
    }

    fn synced(&self, class: &PathClass) -> Result<(), i32> {
        if self.captures() {
            self.capture.synced(class)
        } else {
            Ok(())
        }
    }

    fn before_read(&self, class: &PathClass, offset: u64, len: u32) -> Result<(), i32> {
        match (class, self.read_through.get()) {
            (PathClass::Database(db), Some(rt)) => rt.ensure(db, offset, len),
            _ => Ok(()),
        }
    }

    // Decided by the tailer's state of the database (src/replica/tail/).
    fn kernel_io(&self, class: &PathClass, pid: u32) -> bool {
        self.capture.tails().kernel_io(class, pid)
    }

    fn opened(&self, class: &PathClass, fh: u64, pid: u32, kernel: bool) {
        let own = self.is_applier(pid) || self.capture.tails().is_tailer(pid);
        self.capture.tails().opened(class, fh, kernel, own);
    }

    fn released(&self, class: &PathClass, fh: u64) {
        self.capture.tails().released(class, fh);
    }
}
