//! The lease keeper (docs/ARCHITECTURE.md §3 "Lease, roles and fencing"): the
//! task the daemon runs to take the lease when the policy allows, renew it every
//! TTL/3, watch for hand-over requests, and report [`LeaseState`] on a watch
//! channel for the role state machine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, watch};

use super::Policy;
use crate::remote::StoreError;

use super::*;

/// What the [`LeaseKeeper`] knows, for the daemon's role state machine.
///
/// A watch channel keeps only the latest value, so the daemon may never see a
/// short-lived state (e.g. `Lost` right before `HeldBy`). It must therefore act
/// on transitions: leaving `Held { epoch: e, .. }` for anything else, including
/// `Held` at another epoch, ends tenure `e` (stop accepting writes at once).
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseState {
    /// This node holds the lease. It may write until `valid_until`
    /// (`expires - skew_margin`); the keeper renews well before.
    Held {
        epoch: u64,
        expires: DateTime<Utc>,
        valid_until: DateTime<Utc>,
    },
    /// Another node (or another daemon with this node id) holds it.
    HeldBy {
        node: String,
        epoch: u64,
        expires: DateTime<Utc>,
    },
    /// Nobody holds a valid lease and this node did not take it (not yet, or
    /// the policy forbids it). Also the state before the first read.
    None,
    /// The lease this node held is gone against its will (taken, deleted, or
    /// not renewed in time). The keeper goes on watching.
    Lost { reason: String },
    /// This node gave up the lease at `epoch` on purpose (unmount, `membridge
    /// leadership release`): not a loss. The keeper goes on watching.
    Released { epoch: u64 },
    /// The lease object is malformed or belongs to another project: nobody may
    /// be primary until an operator fixes it.
    Unusable { reason: String },
    /// `LEADERSHIP_ENABLED=0`: this node writes without a lease.
    Disabled,
}

impl LeaseState {
    pub fn is_held(&self) -> bool {
        matches!(self, LeaseState::Held { .. })
    }

    /// The epoch this node holds, if any.
    pub fn held_epoch(&self) -> Option<u64> {
        match self {
            LeaseState::Held { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }
}

/// Timing of a [`LeaseKeeper`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeeperOptions {
    /// Renew this long after the last renewal (TTL/3).
    pub renew_every: Duration,
    /// While not holding: read the lease this often (TTL/3, at most 5 s).
    pub poll_every: Duration,
    /// After a failed renewal: try again this soon (while time is left).
    pub retry_every: Duration,
    /// After this node released its lease: do not take it again for this long,
    /// so that another node can (one TTL).
    pub release_backoff: Duration,
    /// Upper bound on one store call while not holding the lease.
    pub call_timeout: Duration,
    /// While holding: look for hand-over requests this often.
    pub watch_primary: Duration,
    /// While not holding (and allowed to hold): look for a request naming
    /// this node this often.
    pub watch_other: Duration,
    /// Read the lease this often while a hand-over to this node is pending.
    pub expect_poll: Duration,
}

impl KeeperOptions {
    pub fn for_ttl(ttl: Duration) -> KeeperOptions {
        let third = ttl / 3;
        KeeperOptions {
            renew_every: third,
            poll_every: third.min(Duration::from_secs(5)),
            retry_every: third.min(Duration::from_millis(500)),
            release_backoff: ttl,
            call_timeout: ttl.max(Duration::from_secs(5)),
            watch_primary: HANDOVER_WATCH_PRIMARY,
            watch_other: HANDOVER_WATCH_SECONDARY,
            expect_poll: HANDOVER_POLL,
        }
    }
}

enum Cmd {
    HandOver {
        target: String,
        reason: String,
        reply: oneshot::Sender<Result<Versioned, LeaseError>>,
    },
    /// A hand-over to this node is pending: read the lease closely for this long.
    Expect(Duration),
    /// Take the held lease again at an epoch above this one.
    RaiseAbove {
        epoch: u64,
        reply: oneshot::Sender<Result<Versioned, LeaseError>>,
    },
    Release {
        reply: oneshot::Sender<Result<(), LeaseError>>,
    },
    Stop {
        release: bool,
        reply: oneshot::Sender<Result<(), LeaseError>>,
    },
}

/// The daemon's lease task: takes the lease when the policy allows, renews it
/// every TTL/3, watches it otherwise, and publishes [`LeaseState`]. No store
/// call can hold it past the time left on a held lease: each is bounded by a
/// timeout that ends at the holder's deadline, and the state turns to `Lost`
/// then. Dropping the handle stops the task without releasing the lease (like
/// a crash: it expires); [`LeaseKeeper::shutdown`] can release it first.
pub struct LeaseKeeper {
    client: LeaseClient,
    state: watch::Receiver<LeaseState>,
    /// The last epoch this node released on purpose (0: none). Kept apart
    /// from `state`, whose watchers may miss a short-lived value: whoever
    /// sees the lease gone asks [`LeaseKeeper::released_on_purpose`].
    released: Arc<AtomicU64>,
    handover: watch::Receiver<Option<Handover>>,
    pending: watch::Receiver<bool>,
    cmd: mpsc::Sender<Cmd>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// Starts the task on the current tokio runtime.
    pub fn spawn(client: LeaseClient, opts: KeeperOptions) -> LeaseKeeper {
        let (state_tx, state) = watch::channel(LeaseState::None);
        let (handover_tx, handover) = watch::channel(None);
        let (pending_tx, pending) = watch::channel(false);
        let (cmd, cmd_rx) = mpsc::channel(4);
        let released = Arc::new(AtomicU64::new(0));
        let now = tokio::time::Instant::now();
        let task = tokio::spawn(
            KeeperTask {
                client: client.clone(),
                opts,
                released: released.clone(),
                state_tx,
                handover_tx,
                pending_tx,
                held: None,
                started: false,
                next_renew: tokio::time::Instant::now(),
                backoff_until: None,
                last_error: None,
                expect_until: None,
                watch_next: now,
                watch_etag: None,
                watched: None,
            }
            .run(cmd_rx),
        );
        LeaseKeeper {
            client,
            state,
            released,
            handover,
            pending,
            cmd,
            task,
        }
    }

    /// Whether this node gave up the lease of `epoch` on purpose (a release,
    /// not a loss).
    pub fn released_on_purpose(&self, epoch: u64) -> bool {
        epoch != 0 && self.released.load(Ordering::Acquire) == epoch
    }

    pub fn state(&self) -> LeaseState {
        self.state.borrow().clone()
    }

    /// A receiver of every state change.
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Hand-over requests (`handover.json`) for the epoch this node holds,
    /// looked for every [`KeeperOptions::watch_primary`]. On `Some(h)`: flush
    /// and publish, then call [`LeaseKeeper::hand_over`] with `h.to` (or
    /// decline a follow request: [`LeaseClient::refuse_handover`]).
    pub fn handover_requests(&self) -> watch::Receiver<Option<Handover>> {
        self.handover.clone()
    }

    /// Whether a hand-over to this node is pending (it reads the lease
    /// closely meanwhile): the node keeps its view current too, so that it
    /// takes writes the moment the lease comes.
    pub fn handover_pending(&self) -> watch::Receiver<bool> {
        self.pending.clone()
    }

    /// The client the keeper uses (same node, same session).
    pub fn client(&self) -> &LeaseClient {
        &self.client
    }

    /// A hand-over to this node was asked for here (`leadership select` or
    /// `follow` on this machine, the status page): read the lease every
    /// [`KeeperOptions::expect_poll`] for up to `d`, so that it is taken up
    /// at once. Never blocks.
    pub fn expect_lease(&self, d: Duration) {
        let _ = self.cmd.try_send(Cmd::Expect(d));
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, LeaseError>>) -> Cmd,
    ) -> Result<T, LeaseError> {
        let (tx, rx) = oneshot::channel();
        let gone = || LeaseError::NotAllowed("the lease keeper has stopped".into());
        self.cmd.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Writes the lease for `target` at `epoch + 1` if this node holds it. The
    /// caller must have stopped writing and published everything first.
    pub async fn hand_over(&self, target: &str) -> Result<Versioned, LeaseError> {
        self.hand_over_for(target, "requested by select").await
    }

    /// [`LeaseKeeper::hand_over`], with the reason for the audit entry.
    pub async fn hand_over_for(&self, target: &str, reason: &str) -> Result<Versioned, LeaseError> {
        let (target, reason) = (target.to_string(), reason.to_string());
        self.call(|reply| Cmd::HandOver {
            target,
            reason,
            reply,
        })
        .await
    }

    /// The manifest is at `epoch`, above the held lease's: takes the lease
    /// again at `epoch + 1` (the state moves to `Held` at that epoch).
    pub async fn raise_epoch_above(&self, epoch: u64) -> Result<Versioned, LeaseError> {
        self.call(|reply| Cmd::RaiseAbove { epoch, reply }).await
    }

    /// Releases the lease if this node holds it, and keeps away from it for
    /// `release_backoff` so that another node can take it.
    pub async fn release(&self) -> Result<(), LeaseError> {
        self.call(|reply| Cmd::Release { reply }).await
    }

    /// Stops the task, releasing the lease first if `release` and it is held.
    pub async fn shutdown(self, release: bool) -> Result<(), LeaseError> {
        let r = self.call(|reply| Cmd::Stop { release, reply }).await;
        let _ = self.task.await;
        r
    }
}

struct KeeperTask {
    client: LeaseClient,
    opts: KeeperOptions,
    released: Arc<AtomicU64>,
    state_tx: watch::Sender<LeaseState>,
    handover_tx: watch::Sender<Option<Handover>>,
    pending_tx: watch::Sender<bool>,
    held: Option<Versioned>,
    /// Whether the first successful acquire attempt (which reclaims a lease of
    /// this node's earlier run) has happened.
    started: bool,
    next_renew: tokio::time::Instant,
    backoff_until: Option<tokio::time::Instant>,
    last_error: Option<String>,
    /// A hand-over to this node is pending until then: poll the lease closely.
    expect_until: Option<tokio::time::Instant>,
    /// When to look at `handover.json` next, the ETag last read and what it held.
    watch_next: tokio::time::Instant,
    watch_etag: Option<String>,
    watched: Option<Handover>,
}

/// Time from now until `t`, zero if past.
fn until(t: DateTime<Utc>) -> Duration {
    (t - Utc::now()).to_std().unwrap_or(Duration::ZERO)
}

impl KeeperTask {
    /// Reads the lease closely until `until_t` (`None`: no more).
    fn expect(&mut self, until_t: Option<tokio::time::Instant>) {
        self.expect_until = until_t;
        self.pending_tx.send_if_modified(|p| {
            let changed = *p != until_t.is_some();
            *p = until_t.is_some();
            changed
        });
    }

    fn publish(&self, s: LeaseState) {
        self.state_tx.send_if_modified(|cur| {
            if *cur == s {
                false
            } else {
                *cur = s;
                true
            }
        });
    }

    fn publish_seen(&self, current: Option<&Versioned>) {
        let now = Utc::now();
        match current {
            Some(v) if self.client.seen_held(&v.lease, now) => self.publish(LeaseState::HeldBy {
                node: v.lease.primary_node_id.clone(),
                epoch: v.lease.epoch,
                expires: v.lease.expires_at,
            }),
            _ => self.publish(LeaseState::None),
        }
    }

    fn publish_held(&self, v: &Versioned) {
        self.publish(LeaseState::Held {
            epoch: v.lease.epoch,
            expires: v.lease.expires_at,
            valid_until: self.client.holder_deadline(&v.lease),
        });
    }

    /// This node gave up the lease of `epoch` on purpose.
    fn stepped_down(&mut self, epoch: u64) {
        self.held = None;
        self.handover_tx.send_replace(None);
        self.backoff_until = Some(tokio::time::Instant::now() + self.opts.release_backoff);
        self.released.store(epoch, Ordering::Release);
        self.publish(LeaseState::Released { epoch });
    }

    fn lose(&mut self, reason: String) {
        tracing::warn!(node = %self.client.node_id, "lease lost: {reason}");
        self.held = None;
        self.handover_tx.send_replace(None);
        self.publish(LeaseState::Lost { reason });
    }

    async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>) {
        if self.client.policy == Policy::Disabled {
            tracing::warn!(
                "LEADERSHIP_ENABLED=0: leadership is DISABLED. This node writes without a lease; \
                 you must make sure that no other node writes to this project, or data will be lost"
            );
            self.publish(LeaseState::Disabled);
            while let Some(cmd) = cmds.recv().await {
                match cmd {
                    Cmd::HandOver { reply, .. } => drop(reply.send(Err(LeaseError::Disabled))),
                    Cmd::Expect(_) => {}
                    Cmd::RaiseAbove { reply, .. } => drop(reply.send(Err(LeaseError::Disabled))),
                    Cmd::Release { reply } => drop(reply.send(Err(LeaseError::Disabled))),
                    Cmd::Stop { reply, .. } => {
                        let _ = reply.send(Ok(()));
                        return;
                    }
                }
            }
            return;
        }
        loop {
            let wait = if self.held.is_some() {
                self.holding_step().await
            } else {
                self.waiting_step().await
            };
            let wait = wait.min(self.watch_step().await);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(cmd) => if self.command(cmd).await { return },
                },
            }
        }
    }

    /// One step while holding: renew when due. Returns how long to sleep.
    async fn holding_step(&mut self) -> Duration {
        let Some(held) = self.held.clone() else {
            return Duration::ZERO;
        };
        let deadline = self.client.holder_deadline(&held.lease);
        let left = until(deadline);
        if left.is_zero() {
            let why = self
                .last_error
                .take()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            self.lose(format!("could not renew the lease before it ran out{why}"));
            return Duration::ZERO;
        }
        let now = tokio::time::Instant::now();
        if now < self.next_renew {
            return (self.next_renew - now).min(left);
        }
        match tokio::time::timeout(left, self.client.renew(&held)).await {
            Ok(Ok(v)) => {
                self.last_error = None;
                self.next_renew = tokio::time::Instant::now() + self.opts.renew_every;
                self.publish_held(&v);
                self.held = Some(v);
                self.opts.renew_every
            }
            Ok(Err(LeaseError::Lost { reason, current })) => {
                let released_here = current
                    .as_ref()
                    .is_some_and(|c| c.primary_node_id == self.client.node_id && c.is_released());
                if released_here {
                    // `membridge leadership release` on this node: a release,
                    // not a loss. Step aside long enough for another node to
                    // take it.
                    tracing::info!(
                        node = %self.client.node_id,
                        epoch = held.lease.epoch,
                        "the lease was released on request (membridge leadership release)"
                    );
                    self.stepped_down(held.lease.epoch);
                } else {
                    self.lose(reason);
                }
                Duration::ZERO
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "lease renewal failed; retrying");
                self.last_error = Some(e.to_string());
                self.next_renew = tokio::time::Instant::now() + self.opts.retry_every;
                self.opts.retry_every.min(until(deadline))
            }
            Err(_) => {
                self.lose(format!(
                    "the bucket did not answer the renewal within the {} ms left on the lease",
                    left.as_millis()
                ));
                Duration::ZERO
            }
        }
    }

    /// Looks at `handover.json` when due (a conditional GET): the holder
    /// publishes a request it should act on; another node that may hold the
    /// lease starts reading it closely when a request names it. Returns the
    /// time until the next look.
    async fn watch_step(&mut self) -> Duration {
        let now = tokio::time::Instant::now();
        if now < self.watch_next {
            return self.watch_next - now;
        }
        let me = self.client.node_id.clone();
        let every = match &self.held {
            Some(_) => self.opts.watch_primary,
            None if self.client.may_hold(&me).is_ok() => self.opts.watch_other,
            // Never a target (pinned elsewhere, disabled): nothing to watch.
            None => Duration::from_secs(3600),
        };
        self.watch_next = now + every;
        if every >= Duration::from_secs(3600) {
            return every;
        }
        // Never delays a renewal by more than a moment.
        let mut limit = Duration::from_secs(1);
        if let Some(held) = &self.held {
            limit = limit.min(until(self.client.holder_deadline(&held.lease)) / 2);
        }
        let etag = self.watch_etag.clone();
        match tokio::time::timeout(limit, self.client.watch_handover(etag.as_deref())).await {
            Ok(Ok(Watched::Unchanged)) => {}
            Ok(Ok(Watched::Absent)) => {
                self.watch_etag = None;
                self.watched = None;
            }
            Ok(Ok(Watched::Request(h))) => {
                if self.held.is_some() && h.to != me && h.refused.is_none() {
                    if let Err(e) = self.client.may_hold(&h.to) {
                        tracing::warn!(to = %h.to, by = %h.requested_by, "ignoring hand-over request: {e}");
                    }
                }
                self.watch_etag = h.etag.clone();
                self.watched = Some(h);
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the hand-over request");
                self.watch_etag = None;
            }
            Err(_) => {}
        }
        let wall = Utc::now();
        let found = match (&self.held, &self.watched) {
            (Some(held), Some(h))
                if self.client.should_honour(h, held.lease.epoch, wall)
                    && self.client.may_hold(&h.to).is_ok() =>
            {
                Some(h.clone())
            }
            (None, Some(h)) if h.to == me && h.refused.is_none() => {
                let left = (h.at + Handover::max_age(self.client.ttl) - wall)
                    .to_std()
                    .unwrap_or_default();
                if !left.is_zero() {
                    let until_t = tokio::time::Instant::now() + left;
                    if self.expect_until.is_none_or(|t| t < until_t) {
                        if self.expect_until.is_none() {
                            tracing::info!(by = %h.requested_by, "a hand-over to this node is pending");
                        }
                        self.expect(Some(until_t));
                    }
                }
                None
            }
            _ => None,
        };
        if self.held.is_some() {
            self.handover_tx.send_if_modified(|cur| {
                if *cur == found {
                    false
                } else {
                    *cur = found;
                    true
                }
            });
        }
        every
    }

    /// One step while not holding: look, and take the lease if allowed.
    async fn waiting_step(&mut self) -> Duration {
        let now = tokio::time::Instant::now();
        if self.expect_until.is_some_and(|t| t <= now) {
            self.expect(None);
        }
        let poll = if self.expect_until.is_some() {
            self.opts.expect_poll
        } else {
            self.opts.poll_every
        };
        if let Some(until_t) = self.backoff_until {
            if now < until_t {
                let current =
                    match tokio::time::timeout(self.opts.call_timeout, self.client.read()).await {
                        Ok(Ok(c)) => c,
                        _ => return poll.min(until_t - now),
                    };
                // A lease written for this node (select, hand-over) is taken
                // up even while stepping aside from the one it released.
                let for_me = current.as_ref().is_some_and(|v| {
                    v.lease.primary_node_id == self.client.node_id
                        && v.lease.session().is_none()
                        && self.client.seen_held(&v.lease, Utc::now())
                });
                if !for_me {
                    self.publish_seen(current.as_ref());
                    return poll.min(until_t - now);
                }
            } else {
                self.backoff_until = None;
            }
        }
        let attempt = self.client.acquire(!self.started);
        let outcome = match tokio::time::timeout(self.opts.call_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(
                    "the bucket did not answer within {:?} while looking at the lease",
                    self.opts.call_timeout
                );
                return poll;
            }
        };
        match outcome {
            Ok(Acquire::Acquired { held, how }) => {
                self.started = true;
                self.expect(None);
                self.backoff_until = None;
                tracing::info!(
                    node = %self.client.node_id,
                    epoch = held.lease.epoch,
                    how = ?how,
                    "this node holds the lease"
                );
                self.next_renew = tokio::time::Instant::now() + self.opts.renew_every;
                self.publish_held(&held);
                self.held = Some(held);
                self.opts.renew_every
            }
            Ok(Acquire::HeldBy(v)) => {
                self.started = true;
                self.publish_seen(Some(&v));
                // Look again as soon as it can have expired.
                let free_at = v.lease.expires_at + self.client.margin();
                poll.min(until(free_at) + Duration::from_millis(100))
            }
            Ok(Acquire::NotAllowed { current, why }) => {
                self.started = true;
                tracing::debug!("not taking the lease: {why}");
                self.publish_seen(current.as_ref());
                poll
            }
            Ok(Acquire::Disabled) => {
                self.publish(LeaseState::Disabled);
                poll
            }
            Err(e @ (LeaseError::Malformed { .. } | LeaseError::ForeignProject { .. })) => {
                let reason = e.to_string();
                if !matches!(&*self.state_tx.borrow(), LeaseState::Unusable { reason: r } if *r == reason)
                {
                    tracing::error!("{reason}");
                }
                self.publish(LeaseState::Unusable { reason });
                poll
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read or take the lease");
                poll
            }
        }
    }

    /// Handles one command; returns whether to stop.
    async fn command(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::HandOver {
                target,
                reason,
                reply,
            } => {
                let r = self.hand_over(&target, &reason).await;
                let _ = reply.send(r);
                false
            }
            Cmd::RaiseAbove { epoch, reply } => {
                let r = self.raise_above(epoch).await;
                let _ = reply.send(r);
                false
            }
            Cmd::Expect(d) => {
                let until_t = tokio::time::Instant::now() + d;
                if self.held.is_none() && self.expect_until.is_none_or(|t| t < until_t) {
                    self.expect(Some(until_t));
                }
                false
            }
            Cmd::Release { reply } => {
                let r = self.release().await;
                let _ = reply.send(r);
                false
            }
            Cmd::Stop { release, reply } => {
                let r = if release && self.held.is_some() {
                    self.release().await
                } else {
                    Ok(())
                };
                let _ = reply.send(r);
                true
            }
        }
    }

    async fn hand_over(&mut self, target: &str, reason: &str) -> Result<Versioned, LeaseError> {
        let Some(held) = self.held.clone() else {
            return Err(LeaseError::NotAllowed(format!(
                "this node ({}) does not hold the lease",
                self.client.node_id
            )));
        };
        let left = until(self.client.holder_deadline(&held.lease));
        match tokio::time::timeout(left, self.client.hand_over_for(&held, target, reason)).await {
            Ok(Ok(v)) => {
                tracing::info!(to = %target, epoch = v.lease.epoch, "handed the lease over");
                self.held = None;
                self.handover_tx.send_replace(None);
                self.publish_seen(Some(&v));
                Ok(v)
            }
            Ok(Err(e @ LeaseError::Lost { .. })) => {
                self.lose(e.to_string());
                Err(e)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let e = LeaseError::Lost {
                    reason: "the bucket did not answer the hand-over before the lease ran out"
                        .into(),
                    current: None,
                };
                self.lose(e.to_string());
                Err(e)
            }
        }
    }

    async fn raise_above(&mut self, epoch: u64) -> Result<Versioned, LeaseError> {
        let Some(held) = self.held.clone() else {
            return Err(LeaseError::NotAllowed(format!(
                "this node ({}) does not hold the lease",
                self.client.node_id
            )));
        };
        if held.lease.epoch > epoch {
            return Ok(held);
        }
        let left = until(self.client.holder_deadline(&held.lease));
        match tokio::time::timeout(left, self.client.raise_epoch(&held, epoch + 1)).await {
            Ok(Ok(v)) => {
                tracing::info!(
                    from = held.lease.epoch,
                    to = v.lease.epoch,
                    "took the lease again above the manifest's epoch"
                );
                self.next_renew = tokio::time::Instant::now() + self.opts.renew_every;
                self.publish_held(&v);
                self.held = Some(v.clone());
                Ok(v)
            }
            Ok(Err(e @ LeaseError::Lost { .. })) => {
                self.lose(e.to_string());
                Err(e)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(LeaseError::Store(StoreError::Other {
                op: "PUT",
                key: self.client.layout.lease(),
                detail: "the bucket did not answer before the lease ran out".into(),
            })),
        }
    }

    async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(held) = self.held.clone() else {
            return Ok(());
        };
        // Whatever happens next, this node stops acting as the holder now:
        // a release, unless the lease turns out to have been taken already.
        let epoch = held.lease.epoch;
        let left = until(self.client.holder_deadline(&held.lease));
        match tokio::time::timeout(left, self.client.release(&held)).await {
            Ok(Ok(v)) => {
                tracing::info!(epoch = v.lease.epoch, "released the lease");
                self.stepped_down(epoch);
                Ok(())
            }
            Ok(Err(e @ LeaseError::Lost { .. })) => {
                self.backoff_until = Some(tokio::time::Instant::now() + self.opts.release_backoff);
                self.lose(e.to_string());
                Err(e)
            }
            Ok(Err(e)) => {
                tracing::warn!(epoch, error = %e, "the release did not reach the bucket; the lease will expire");
                self.stepped_down(epoch);
                Err(e)
            }
            Err(_) => {
                let reason =
                    "the bucket did not answer the release; the lease will expire".to_string();
                tracing::warn!(epoch, "{reason}");
                self.stepped_down(epoch);
                Err(LeaseError::Lost {
                    reason,
                    current: None,
                })
            }
        }
    }
}
