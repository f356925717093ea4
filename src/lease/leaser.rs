//! What the roles module needs from a lease (docs/ARCHITECTURE.md §3), as a
//! trait: the states it decides from, the hand-over requests it answers, and
//! the three conditional writes it asks for. [`LeaseKeeper`] is the real one
//! (its task renews and takes the lease through a [`LeaseClient`]); the role
//! rules' unit tests use one whose keeper steps they take themselves, over an
//! in-memory bucket with the same compare-and-swap.

use tokio::sync::watch;

use crate::remote::BoxFuture;

use super::*;

pub trait Leaser: Send + Sync {
    /// The lease as this node sees it, at every change.
    fn subscribe(&self) -> watch::Receiver<LeaseState>;
    /// Hand-over requests for the epoch this node holds.
    fn handover_requests(&self) -> watch::Receiver<Option<Handover>>;
    /// Whether this node gave up the lease of `epoch` on purpose (a release
    /// is not a loss).
    fn released_on_purpose(&self, epoch: u64) -> bool;
    /// The manifest is at `epoch`, above the held lease's: take the lease
    /// again above it (the state moves to `Held` at the new epoch).
    fn raise_epoch_above(&self, epoch: u64) -> BoxFuture<'_, Result<Versioned, LeaseError>>;
    /// Write the lease for `target` at the next epoch, if this node still
    /// holds it; the caller stopped writing and published everything first.
    fn hand_over_for<'a>(
        &'a self,
        target: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<Versioned, LeaseError>>;
    /// Decline the request `h` (a follow request while busy), saying why.
    fn refuse_handover<'a>(
        &'a self,
        h: &'a Handover,
        why: &'a str,
    ) -> BoxFuture<'a, Result<bool, LeaseError>>;
}

impl Leaser for LeaseKeeper {
    fn subscribe(&self) -> watch::Receiver<LeaseState> {
        LeaseKeeper::subscribe(self)
    }

    fn handover_requests(&self) -> watch::Receiver<Option<Handover>> {
        LeaseKeeper::handover_requests(self)
    }

    fn released_on_purpose(&self, epoch: u64) -> bool {
        LeaseKeeper::released_on_purpose(self, epoch)
    }

    fn raise_epoch_above(&self, epoch: u64) -> BoxFuture<'_, Result<Versioned, LeaseError>> {
        Box::pin(LeaseKeeper::raise_epoch_above(self, epoch))
    }

    fn hand_over_for<'a>(
        &'a self,
        target: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<Versioned, LeaseError>> {
        Box::pin(LeaseKeeper::hand_over_for(self, target, reason))
    }

    fn refuse_handover<'a>(
        &'a self,
        h: &'a Handover,
        why: &'a str,
    ) -> BoxFuture<'a, Result<bool, LeaseError>> {
        Box::pin(self.client().refuse_handover(h, why))
    }
}
