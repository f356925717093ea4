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

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::fs::class::{PathClass, Sidecar};
use crate::fs::{Invalidator, Replication};
use crate::status::Status;

use super::apply::Applier;
use super::capture::Capture;
use super::hydrate::ReadThrough;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Holds the lease (or leadership is disabled): writes are captured.
    Primary = 0,
    /// Took the lease; catching up with the bucket before accepting writes.
    CatchingUp = 1,
    /// Reads the primary's published state.
    Secondary = 2,
    /// Was primary and lost the lease: refuses writes, keeps its tail aside.
    Fenced = 3,
    /// Primary passing the lease on: no new writes, publishing the backlog.
    HandingOver = 4,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::CatchingUp => "catching-up",
            Role::Secondary => "secondary",
            Role::Fenced => "fenced",
            Role::HandingOver => "handing-over",
        }
    }

    fn from_u8(v: u8) -> Role {
        match v {
            0 => Role::Primary,
            1 => Role::CatchingUp,
            3 => Role::Fenced,
            4 => Role::HandingOver,
            _ => Role::Secondary,
        }
    }
}

pub struct Node {
    capture: Arc<Capture>,
    role: AtomicU8,
    status: Status,
    fencing: std::sync::atomic::AtomicBool,
    /// Pages of a secondary's databases not local yet come from here.
    read_through: std::sync::OnceLock<Arc<ReadThrough>>,
    /// Drops the kernel's cached pages of files changed behind its back.
    invalidator: std::sync::OnceLock<Arc<Invalidator>>,
    /// Commits the primary's transactions into this node's view.
    applier: std::sync::OnceLock<Arc<Applier>>,
}

impl Node {
    pub fn new(capture: Arc<Capture>, role: Role, status: Status) -> Node {
        let node = Node {
            capture,
            role: AtomicU8::new(role as u8),
            status,
            fencing: std::sync::atomic::AtomicBool::new(false),
            read_through: std::sync::OnceLock::new(),
            invalidator: std::sync::OnceLock::new(),
            applier: std::sync::OnceLock::new(),
        };
        node.publish(role);
        node
    }

    pub fn role(&self) -> Role {
        Role::from_u8(self.role.load(Ordering::Acquire))
    }

    pub fn set_role(&self, role: Role) {
        self.set_role_for(role, "");
    }

    /// Changes the role; `reason` goes to the log and to the role history in
    /// `status.json` (a release and a loss of the lease must read differently).
    pub fn set_role_for(&self, role: Role, reason: &str) {
        let old = Role::from_u8(self.role.swap(role as u8, Ordering::AcqRel));
        if old != role {
            if reason.is_empty() {
                tracing::info!(from = old.name(), to = role.name(), "role changed");
            } else {
                tracing::info!(from = old.name(), to = role.name(), reason, "role changed");
            }
            self.publish(role);
            self.status.update(|s| {
                s.role_history.push(crate::status::RoleChange {
                    at: chrono::Utc::now().to_rfc3339(),
                    from: old.name().into(),
                    to: role.name().into(),
                    reason: (!reason.is_empty()).then(|| reason.to_string()),
                });
                let extra = s
                    .role_history
                    .len()
                    .saturating_sub(crate::status::ROLE_HISTORY);
                s.role_history.drain(..extra);
            });
        }
    }

    fn publish(&self, role: Role) {
        self.status.update(|s| s.role = role.name().into());
    }

    fn primary(&self) -> bool {
        self.role() == Role::Primary
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
            let primary = self
                .status
                .snapshot()
                .primary
                .unwrap_or_else(|| "unknown".into());
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

    pub fn set_read_through(&self, rt: Arc<ReadThrough>) {
        let _ = self.read_through.set(rt);
    }

    /// Whether every database is whole locally (a node still hydrating
    /// cannot become primary: its file is not the bucket's head yet).
    pub fn all_local(&self) -> bool {
        self.read_through.get().is_none_or(|r| r.all_local())
    }

    /// This node may no longer write: stop writes at once, keep what was not
    /// published aside, then follow the bucket as a secondary. Blocking I/O.
    pub fn fence(&self, reason: &str) {
        if self.fencing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.set_role_for(Role::Fenced, reason);
        tracing::info!(reason, "fenced: keeping unpublished transactions aside");
        let doc = self.status.snapshot();
        let reports = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.capture.set_aside(&doc.node_id, reason)
        })) {
            Ok(r) => r,
            Err(_) => {
                tracing::error!("setting the divergent copy aside failed");
                Vec::new()
            }
        };
        self.status.update(|s| {
            for p in &reports {
                let p = p.display().to_string();
                if !s.divergent.contains(&p) {
                    s.divergent.push(p);
                }
            }
            s.last_error = Some(format!("fenced: {reason}"));
        });
        self.set_role(Role::Secondary);
        self.fencing.store(false, Ordering::Release);
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

    fn before_write(&self, class: &PathClass, offset: u64, len: u64) -> Result<(), i32> {
        match (class, self.read_through.get()) {
            (PathClass::Database(db), Some(rt)) if !self.primary() => {
                rt.claim(db, offset, len);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    // Capture runs on the primary only: on any other role the writes that
    // get through are the view applier's, already in the bucket.
    fn written(&self, class: &PathClass, offset: u64, len: u64) -> Result<(), i32> {
        if !self.primary() {
            return Ok(());
        }
        self.capture.written(class, offset, len)
    }

    fn truncated(&self, class: &PathClass, len: u64) -> Result<(), i32> {
        if !self.primary() {
            return Ok(());
        }
        self.capture.truncated(class, len)
    }

    fn removed(&self, class: &PathClass) -> Result<(), i32> {
        if !self.primary() {
            return Ok(());
        }
        self.capture.removed(class)
    }

    fn replaced(&self, class: &PathClass) -> Result<(), i32> {
        if !self.primary() {
            return Ok(());
        }
        self.capture.replaced(class)
    }

    fn synced(&self, class: &PathClass) -> Result<(), i32> {
        if self.primary() {
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
}

/// Follow the lease and drive the node's role: a new lease goes through
/// catching-up (the bucket's head must be this node's head, and the manifest
/// epoch is bumped) before writes are accepted; a lost lease fences the node.
pub async fn drive_roles(
    node: Arc<Node>,
    keeper: Arc<crate::lease::LeaseKeeper>,
    epoch: Arc<std::sync::atomic::AtomicU64>,
    uploader: tokio::sync::mpsc::Sender<super::uploader::Command>,
    status: Status,
) {
    use crate::lease::LeaseState;
    let mut states = keeper.subscribe();
    let mut handovers = keeper.handover_requests();
    loop {
        let state = states.borrow_and_update().clone();
        let was = node.role();
        match &state {
            LeaseState::Held { epoch: e, .. } => {
                if was != Role::Primary || epoch.load(Ordering::Acquire) != *e {
                    node.set_role(Role::CatchingUp);
                    epoch.store(*e, Ordering::Release);
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let ready = match uploader
                        .send(super::uploader::Command::TakeOver(*e, tx))
                        .await
                    {
                        Ok(()) => rx.await.unwrap_or_else(|_| Err("uploader stopped".into())),
                        Err(_) => Err("uploader stopped".into()),
                    };
                    match ready {
                        Ok(()) => {
                            node.set_role(Role::Primary);
                            status.update(|s| s.last_error = None);
                        }
                        Err(why) => {
                            tracing::info!(%why, "holding the lease; catching up before taking writes");
                            status.update(|s| s.last_error = Some(why));
                        }
                    }
                }
                status.update(|s| {
                    s.epoch = Some(*e);
                    s.primary = Some(s.node_id.clone());
                });
            }
            LeaseState::Disabled => node.set_role(Role::Primary),
            other => {
                let released = keeper.released_on_purpose(epoch.load(Ordering::Acquire));
                if was == Role::HandingOver {
                    // A graceful hand-over published everything first.
                    node.set_role(Role::Secondary);
                } else if was == Role::Primary && released {
                    // Given up on purpose (unmount, `leadership release`): not
                    // a loss. Only what the bucket lacks is kept aside.
                    let unpublished = node.capture().unpublished();
                    if unpublished == 0 {
                        node.set_role_for(Role::Secondary, "lease released");
                    } else {
                        tracing::warn!(
                            transactions = unpublished,
                            "lease released before everything was published"
                        );
                        let (n, why) = (
                            node.clone(),
                            format!("lease released with {unpublished} unpublished transaction(s)"),
                        );
                        let _ = tokio::task::spawn_blocking(move || n.fence(&why)).await;
                    }
                } else if was == Role::Primary {
                    tracing::warn!(state = ?other, "lease lost: no more writes on this node");
                    let (n, why) = (node.clone(), format!("lease lost ({other:?})"));
                    let _ = tokio::task::spawn_blocking(move || n.fence(&why)).await;
                } else if was != Role::Fenced {
                    node.set_role(Role::Secondary);
                }
                status.update(|s| match other {
                    LeaseState::HeldBy {
                        node: p, epoch: e, ..
                    } => {
                        s.primary = Some(p.clone());
                        s.epoch = Some(*e);
                    }
                    LeaseState::Unusable { reason } | LeaseState::Lost { reason } => {
                        s.last_error = Some(reason.clone());
                        s.primary = None;
                    }
                    LeaseState::Released { .. } => {
                        s.last_error = None;
                        s.primary = None;
                    }
                    _ => s.primary = None,
                });
            }
        }
        // Still catching up with the lease in hand: try again shortly (the
        // follower keeps applying meanwhile).
        let retry = node.role() == Role::CatchingUp && state.is_held();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
            changed = states.changed() => if changed.is_err() { return },
            changed = handovers.changed() => {
                if changed.is_err() {
                    return;
                }
                let request = handovers.borrow_and_update().clone();
                if let (Some(h), Role::Primary) = (request, node.role()) {
                    hand_over(&node, &keeper, &uploader, &h.to).await;
                }
            }
        }
    }
}

/// Graceful hand-over: stop writes, publish everything, then pass the lease.
async fn hand_over(
    node: &Node,
    keeper: &crate::lease::LeaseKeeper,
    uploader: &tokio::sync::mpsc::Sender<super::uploader::Command>,
    to: &str,
) {
    tracing::info!(to, "handing the lease over: flushing first");
    node.set_role(Role::HandingOver);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let flushed = uploader
        .send(super::uploader::Command::Push(tx))
        .await
        .is_ok()
        && matches!(rx.await, Ok(Ok(_)));
    if !flushed {
        tracing::warn!(
            to,
            "hand-over postponed: the backlog could not be published"
        );
        node.set_role(Role::Primary);
        return;
    }
    if let Err(e) = keeper.hand_over(to).await {
        tracing::warn!(to, error = %e, "hand-over failed; still primary");
        node.set_role(Role::Primary);
    }
}
