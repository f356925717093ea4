//! One owner of the node's lifecycle (docs/ARCHITECTURE.md, "Lease, roles and
//! fencing"): every role transition (secondary, catching-up, primary,
//! handing-over, fenced, released) is decided here, from the lease (the
//! keeper's state), the manifest (the uploader's take-over and its typed
//! failures) and the journal (what is still unpublished).
//!
//! The role, the tenure, the role history and who holds the lease are state
//! owned by [`Lifecycle`]; `status.json` is only written from it, never read
//! back to decide anything. The uploader does not fence: it reports a
//! [`Fenced`] outcome and [`drive_roles`] acts on it.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::node::Node;
use super::uploader::{Command, Fenced, NotYet, Outcome};
use crate::lease::{Handover, LeaseState, Leaser};
use crate::status::{RoleChange, Status, ROLE_HISTORY};

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

    /// Whether the uploader publishes in this role: the primary, and one
    /// finishing its work before a hand-over.
    pub fn publishes(self) -> bool {
        matches!(self, Role::Primary | Role::HandingOver)
    }
}

/// The lifecycle state a node owns; `status.json` is its projection.
pub struct Lifecycle {
    node_id: String,
    role: AtomicU8,
    /// Set while a fencing runs (it takes blocking I/O): a second one waits
    /// for nothing and returns.
    fencing: AtomicBool,
    /// When this tenure as primary began (ms since the epoch; 0: not primary).
    primary_since_ms: AtomicI64,
    /// The last role changes, oldest first (at most [`ROLE_HISTORY`]).
    history: Mutex<Vec<RoleChange>>,
    /// Who holds the lease, as the keeper last saw it (named in refusals).
    holder: Mutex<Option<String>>,
    /// Notified at every role change: the heartbeat says so at once.
    changed: Arc<Notify>,
    status: Status,
    /// Told `false` before the node stops being primary and `true` once it
    /// is: writers the daemon does not see are stopped and let go.
    writers: std::sync::OnceLock<Box<dyn Fn(bool) + Send + Sync>>,
}

impl Lifecycle {
    pub fn new(node_id: &str, role: Role, status: Status) -> Lifecycle {
        let l = Lifecycle {
            node_id: node_id.to_string(),
            role: AtomicU8::new(role as u8),
            fencing: AtomicBool::new(false),
            primary_since_ms: AtomicI64::new(if role == Role::Primary {
                Utc::now().timestamp_millis()
            } else {
                0
            }),
            history: Mutex::new(Vec::new()),
            holder: Mutex::new(None),
            changed: Arc::new(Notify::new()),
            status,
            writers: std::sync::OnceLock::new(),
        };
        l.status.update(|s| s.role = role.name().into());
        l
    }

    /// See [`Lifecycle::writers`]; called with the current role's answer
    /// at once.
    pub fn on_writers(&self, f: Box<dyn Fn(bool) + Send + Sync>) {
        f(self.role() == Role::Primary);
        let _ = self.writers.set(f);
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn role(&self) -> Role {
        Role::from_u8(self.role.load(Ordering::Acquire))
    }

    pub fn changes(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    pub fn primary_since(&self) -> Option<DateTime<Utc>> {
        match self.primary_since_ms.load(Ordering::Acquire) {
            0 => None,
            ms => DateTime::from_timestamp_millis(ms),
        }
    }

    /// Who holds the lease, if known.
    pub fn holder(&self) -> Option<String> {
        self.holder.lock().unwrap().clone()
    }

    /// What the keeper says about the lease: who holds it and at which epoch
    /// (`status.json` shows both; `epoch` None leaves it as it was).
    fn set_holder(&self, holder: Option<String>, epoch: Option<u64>) {
        *self.holder.lock().unwrap() = holder.clone();
        self.status.update(|s| {
            s.primary = holder;
            if epoch.is_some() {
                s.epoch = epoch;
            }
        });
    }

    /// Changes the role; `reason` goes to the log and to the role history
    /// (a release and a loss of the lease must read differently).
    pub fn set(&self, role: Role, reason: &str) {
        let before = self.role();
        if before == Role::Primary && role != Role::Primary {
            if let Some(f) = self.writers.get() {
                f(false);
            }
        }
        let old = Role::from_u8(self.role.swap(role as u8, Ordering::AcqRel));
        if role == Role::Primary && old != Role::Primary {
            if let Some(f) = self.writers.get() {
                f(true);
            }
        }
        if old == role {
            return;
        }
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
        let history = {
            let mut h = self.history.lock().unwrap();
            h.push(RoleChange {
                at: Utc::now().to_rfc3339(),
                from: old.name().into(),
                to: role.name().into(),
                reason: (!reason.is_empty()).then(|| reason.to_string()),
            });
            let extra = h.len().saturating_sub(ROLE_HISTORY);
            h.drain(..extra);
            h.clone()
        };
        self.status.update(|s| {
            s.role = role.name().into();
            s.role_history = history;
        });
        self.changed.notify_one();
    }

    /// The role history, oldest first.
    pub fn history(&self) -> Vec<RoleChange> {
        self.history.lock().unwrap().clone()
    }
}

impl Node {
    /// This node may no longer write: stop writes at once, keep what was not
    /// published aside, then follow the bucket as a secondary. Blocking I/O.
    pub fn fence(&self, reason: &str) {
        let life = self.lifecycle();
        if life.fencing.swap(true, Ordering::AcqRel) {
            return;
        }
        life.set(Role::Fenced, reason);
        tracing::info!(reason, "fenced: keeping unpublished transactions aside");
        let reports = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.capture().set_aside(life.node_id(), reason)
        })) {
            Ok(r) => r,
            Err(_) => {
                tracing::error!("setting the divergent copy aside failed");
                Vec::new()
            }
        };
        life.status.update(|s| {
            for p in &reports {
                let p = p.display().to_string();
                if !s.divergent.contains(&p) {
                    s.divergent.push(p);
                }
            }
            s.last_error = Some(format!("fenced: {reason}"));
        });
        life.set(Role::Secondary, "");
        life.fencing.store(false, Ordering::Release);
    }

    /// The uploader found this node deposed (`f`): fence it, unless the
    /// report is stale (the node took the lease again since, or stopped
    /// publishing already: the lease path fenced or released it).
    pub fn fence_reported(&self, f: &Fenced, epoch: u64) -> bool {
        if f.epoch != epoch || !self.role().publishes() {
            return false;
        }
        self.fence(&f.why);
        true
    }

    /// The lease is not (or no longer) this node's: a hand-over ends as a
    /// secondary, a release is not a loss (only what the bucket lacks is kept
    /// aside), a loss fences. `released`: this node gave it up on purpose.
    pub fn lease_gone(&self, released: bool, why: &str) {
        let was = self.role();
        if was == Role::HandingOver {
            // A graceful hand-over published everything first.
            self.set_role(Role::Secondary);
        } else if was == Role::Primary && released {
            let unpublished = self.capture().unpublished();
            if unpublished == 0 {
                self.set_role_for(Role::Secondary, "lease released");
            } else {
                tracing::warn!(
                    transactions = unpublished,
                    "lease released before everything was published"
                );
                self.fence(&format!(
                    "lease released with {unpublished} unpublished transaction(s)"
                ));
            }
        } else if was == Role::Primary {
            tracing::warn!(why, "lease lost: no more writes on this node");
            self.fence(why);
        } else if was != Role::Fenced {
            self.set_role(Role::Secondary);
        }
    }
}

/// Follow the lease and drive the node's role: a new lease goes through
/// catching-up (the bucket's head must be this node's head, and the manifest
/// epoch is bumped) before writes are accepted; a lost lease, or the
/// uploader finding a newer epoch in the bucket, fences the node.
pub async fn drive_roles(
    node: Arc<Node>,
    keeper: Arc<dyn Leaser>,
    epoch: Arc<AtomicU64>,
    uploader: tokio::sync::mpsc::Sender<Command>,
    mut fenced: tokio::sync::mpsc::UnboundedReceiver<Fenced>,
    status: Status,
) {
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
                node.lifecycle()
                    .set_holder(Some(node.lifecycle().node_id().to_string()), Some(*e));
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
                    let ready = match uploader.send(Command::TakeOver(*e, tx)).await {
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
                let (n, why) = (node.clone(), format!("lease lost ({other:?})"));
                let _ = tokio::task::spawn_blocking(move || n.lease_gone(released, &why)).await;
                let life = node.lifecycle();
                match other {
                    LeaseState::HeldBy {
                        node: p, epoch: e, ..
                    } => life.set_holder(Some(p.clone()), Some(*e)),
                    LeaseState::Unusable { reason } | LeaseState::Lost { reason } => {
                        life.set_holder(None, None);
                        status.update(|s| s.last_error = Some(reason.clone()));
                    }
                    LeaseState::Released { .. } => {
                        life.set_holder(None, None);
                        status.update(|s| s.last_error = None);
                    }
                    _ => life.set_holder(None, None),
                }
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
            Some(f) = fenced.recv() => {
                let (n, e) = (node.clone(), epoch.load(Ordering::Acquire));
                let _ = tokio::task::spawn_blocking(move || n.fence_reported(&f, e)).await;
            }
            changed = handovers.changed() => {
                if changed.is_err() {
                    return;
                }
                let request = handovers.borrow_and_update().clone();
                if let (Some(h), Role::Primary) = (request, node.role()) {
                    hand_over(&node, keeper.as_ref(), &uploader, &h).await;
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
    keeper: &dyn Leaser,
    uploader: &tokio::sync::mpsc::Sender<Command>,
    h: &Handover,
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
    if let Err(Outcome::Fenced) = flush(uploader).await {
        return; // deposed meanwhile: the uploader's report fences it
    }
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
        match flush(uploader).await {
            Ok(()) => {}
            // Deposed meanwhile: the uploader's report fences it.
            Err(Outcome::Fenced) => return,
            Err(_) => break,
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

/// Publishes the backlog now; what kind of failure stopped it, if one did.
async fn flush(uploader: &tokio::sync::mpsc::Sender<Command>) -> Result<(), Outcome> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if uploader.send(Command::Flush(tx)).await.is_err() {
        return Err(Outcome::Transient);
    }
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.outcome()),
        Err(_) => Err(Outcome::Transient),
    }
}

/// How long a hand-over lets writes already past the role gate land.
const DRAIN: Duration = Duration::from_millis(20);

async fn decline(keeper: &dyn Leaser, h: &Handover, why: &str) {
    tracing::info!(to = %h.to, why, "declined to hand over: this node is busy");
    if let Err(e) = keeper.refuse_handover(h, why).await {
        tracing::warn!(error = %e, "could not answer the hand-over request");
    }
}

#[cfg(test)]
mod tests;
