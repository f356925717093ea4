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

use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use crate::fs::class::{PathClass, Sidecar};
use crate::fs::{Invalidator, Replication};
use crate::status::Status;

use super::apply::Applier;
use super::capture::Capture;
use super::hydrate::ReadThrough;
use super::uploader::NotYet;

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
    /// Wakes the follower before its next poll is due (a promotion waits on
    /// the old primary's last transactions).
    poke: Notify,
    /// Notified at every role change: the heartbeat says so at once.
    changed: Arc<Notify>,
    /// When this tenure as primary began (ms since the epoch; 0: not primary).
    primary_since_ms: AtomicI64,
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
            poke: Notify::new(),
            changed: Arc::new(Notify::new()),
            primary_since_ms: AtomicI64::new(if role == Role::Primary {
                Utc::now().timestamp_millis()
            } else {
                0
            }),
        };
        node.publish(role);
        node
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
        self.changed.clone()
    }

    /// The last transaction captured in this run of the daemon.
    pub fn last_write(&self) -> Option<DateTime<Utc>> {
        self.capture.last_commit()
    }

    /// When this node became primary, while it is.
    pub fn primary_since(&self) -> Option<DateTime<Utc>> {
        match self.primary_since_ms.load(Ordering::Acquire) {
            0 => None,
            ms => DateTime::from_timestamp_millis(ms),
        }
    }

    /// Why this primary is not idle for `idle` (policy `follow`), if it is not.
    pub fn busy(&self, idle: Duration) -> Option<String> {
        crate::lease::busy_reason(self.last_write(), self.primary_since(), idle, Utc::now())
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
            // A hand-over given up continues the tenure it interrupted.
            match role {
                Role::Primary if old != Role::HandingOver => self
                    .primary_since_ms
                    .store(Utc::now().timestamp_millis(), Ordering::Release),
                Role::Primary | Role::HandingOver => {}
                _ => self.primary_since_ms.store(0, Ordering::Release),
            }
            self.publish(role);
            self.changed.notify_one();
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

    /// Whether writes that reach the files are captured: on the primary, and
    /// while it hands over (a write let through just before the gate closed
    /// is still its to publish; no new one gets through).
    fn captures(&self) -> bool {
        matches!(self.role(), Role::Primary | Role::HandingOver)
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
    // While catching up with the lease in hand: how soon to try again.
    let mut retry_in = CATCH_UP_RETRY_MIN;
    let mut tries = 0;
    let mut last_why: Option<String> = None;
    loop {
        let state = states.borrow_and_update().clone();
        let was = node.role();
        match &state {
            LeaseState::Held { epoch: e, .. } => {
                // Before the role: the heartbeat written at the role change
                // names the epoch too.
                status.update(|s| {
                    s.epoch = Some(*e);
                    s.primary = Some(s.node_id.clone());
                });
                if was != Role::Primary || epoch.load(Ordering::Acquire) != *e {
                    if was != Role::CatchingUp {
                        retry_in = CATCH_UP_RETRY_MIN;
                        tries = 0;
                    }
                    node.set_role(Role::CatchingUp);
                    epoch.store(*e, Ordering::Release);
                    // The old primary's last transactions were published a
                    // moment ago: fetch them now, not at the next poll.
                    node.poll_now();
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let stopped = || NotYet::Wait("uploader stopped".into());
                    let ready = match uploader
                        .send(super::uploader::Command::TakeOver(*e, tx))
                        .await
                    {
                        Ok(()) => rx.await.unwrap_or_else(|_| Err(stopped())),
                        Err(_) => Err(stopped()),
                    };
                    match ready {
                        Ok(()) => {
                            node.set_role(Role::Primary);
                            status.update(|s| s.last_error = None);
                            last_why = None;
                        }
                        Err(NotYet::EpochBehind { manifest, lease }) => {
                            // Retrying at this epoch would loop for ever.
                            tracing::warn!(
                                manifest,
                                lease,
                                "the lease's epoch is below the manifest's: taking it again above both"
                            );
                            if let Err(err) = keeper.raise_epoch_above(manifest).await {
                                let why = format!("cannot raise the lease's epoch above the manifest's {manifest}: {err}");
                                tracing::warn!("{why}");
                                status.update(|s| s.last_error = Some(why));
                            }
                        }
                        Err(NotYet::Wait(why)) => {
                            // Said once per reason, not at every retry.
                            if last_why.as_deref() != Some(why.as_str()) {
                                tracing::info!(%why, "holding the lease; catching up before taking writes");
                            }
                            status.update(|s| s.last_error = Some(why.clone()));
                            last_why = Some(why);
                        }
                    }
                }
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
        // follower keeps applying meanwhile), soon at first, then every second.
        let retry = node.role() == Role::CatchingUp && state.is_held();
        let wait = retry_in;
        if retry {
            tries += 1;
            if tries >= CATCH_UP_QUICK_TRIES {
                retry_in = CATCH_UP_RETRY_MAX;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait), if retry => {}
            changed = states.changed() => if changed.is_err() { return },
            changed = handovers.changed() => {
                if changed.is_err() {
                    return;
                }
                let request = handovers.borrow_and_update().clone();
                if let (Some(h), Role::Primary) = (request, node.role()) {
                    hand_over(&node, &keeper, &uploader, &h).await;
                }
            }
        }
    }
}

/// While a hand-over to this node is pending, keep the view at the bucket's
/// head (the follower looks every [`crate::lease::HANDOVER_POLL`] instead of
/// every poll interval): the lease then finds it caught up.
pub async fn follow_closely(node: Arc<Node>, mut pending: tokio::sync::watch::Receiver<bool>) {
    loop {
        if *pending.borrow_and_update() {
            node.poll_now();
            tokio::select! {
                _ = tokio::time::sleep(crate::lease::HANDOVER_POLL) => {}
                r = pending.changed() => if r.is_err() { return },
            }
        } else if pending.changed().await.is_err() {
            return;
        }
    }
}

/// While catching up with the lease in hand, the first retries come this
/// soon (a hand-over: the last segment is a poll away)...
const CATCH_UP_RETRY_MIN: Duration = Duration::from_millis(100);
const CATCH_UP_QUICK_TRIES: u32 = 20;
/// ...and later ones (a long catch-up, hydration) every second.
const CATCH_UP_RETRY_MAX: Duration = Duration::from_secs(1);

/// Graceful hand-over: stop writes, publish everything, then pass the lease.
/// A follow request (policy `follow`) is declined while this node is busy,
/// judged once more after writes have stopped: a write that got in first
/// keeps the lease here.
async fn hand_over(
    node: &Node,
    keeper: &crate::lease::LeaseKeeper,
    uploader: &tokio::sync::mpsc::Sender<super::uploader::Command>,
    h: &crate::lease::Handover,
) {
    let to = h.to.as_str();
    let idle = h.follow_idle_s.map(Duration::from_secs);
    if let Some(why) = idle.and_then(|i| node.busy(i)) {
        decline(keeper, h, &why).await;
        return;
    }
    let reason = match idle {
        Some(i) => format!("{to} follows the user ({} s idle here)", i.as_secs()),
        None => format!("requested by {}", h.requested_by),
    };
    tracing::info!(to, %reason, "handing the lease over: flushing first");
    // Publish the backlog while still taking writes, so that writes stop
    // only for the last few transactions (and the target can fetch most of
    // them meanwhile).
    let _ = flush(uploader).await;
    node.set_role_for(Role::HandingOver, &format!("hand-over to {to}"));
    // A write let through just before the gate closed lands now: it is
    // captured (and published below) or, for a follow request, keeps the
    // lease here.
    tokio::time::sleep(DRAIN).await;
    if let Some(why) = idle.and_then(|i| node.busy(i)) {
        node.set_role(Role::Primary);
        decline(keeper, h, &why).await;
        return;
    }
    let mut flushed = false;
    for _ in 0..3 {
        if !flush(uploader).await {
            break;
        }
        if node.capture().unpublished() == 0 {
            flushed = true;
            break;
        }
    }
    if !flushed {
        tracing::warn!(
            to,
            "hand-over postponed: the backlog could not be published"
        );
        node.set_role(Role::Primary);
        return;
    }
    if let Err(e) = keeper.hand_over_for(to, &reason).await {
        tracing::warn!(to, error = %e, "hand-over failed; still primary");
        node.set_role(Role::Primary);
    }
}

/// Publishes the backlog now; whether it worked.
async fn flush(uploader: &tokio::sync::mpsc::Sender<super::uploader::Command>) -> bool {
    let (tx, rx) = tokio::sync::oneshot::channel();
    uploader
        .send(super::uploader::Command::Flush(tx))
        .await
        .is_ok()
        && matches!(rx.await, Ok(Ok(())))
}

/// How long a hand-over lets writes already past the role gate land.
const DRAIN: Duration = Duration::from_millis(20);

async fn decline(keeper: &crate::lease::LeaseKeeper, h: &crate::lease::Handover, why: &str) {
    tracing::info!(to = %h.to, why, "declined to hand over: this node is busy");
    if let Err(e) = keeper.client().refuse_handover(h, why).await {
        tracing::warn!(error = %e, "could not answer the hand-over request");
    }
}
