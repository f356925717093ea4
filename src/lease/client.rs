//! One node's operations on the lease (docs/ARCHITECTURE.md §3 "Lease, roles
//! and fencing"): [`LeaseClient`] reads the lease and the hand-over request and
//! changes the lease only by conditional writes, each followed by an audit
//! entry; a conditional write that fails is the fencing signal.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::remote::{Layout, ObjectStore, PutMode, StoreError};

use super::time::fmt_time;
use super::*;

/// How many times an operation re-reads and retries after losing a race on the
/// lease (a conditional write that failed because someone else wrote first).
pub(super) const RACE_ROUNDS: usize = 3;

/// One node's view of and operations on the lease. Cheap to clone.
#[derive(Clone)]
pub struct LeaseClient {
    pub store: Arc<dyn ObjectStore>,
    pub layout: Layout,
    pub canonical_id: String,
    pub node_id: String,
    pub policy: Policy,
    /// Written as `lease_seconds` (whole seconds, at least 1).
    pub ttl: Duration,
    /// See the module docs; [`LeaseClient::default_skew_margin`] by default.
    pub skew_margin: Duration,
    /// Random per client: identifies this daemon run in the leases it holds.
    pub session: String,
}

impl std::fmt::Debug for LeaseClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseClient")
            .field("store", &self.store.describe())
            .field("canonical_id", &self.canonical_id)
            .field("node_id", &self.node_id)
            .field("policy", &self.policy)
            .field("ttl", &self.ttl)
            .field("skew_margin", &self.skew_margin)
            .field("session", &self.session)
            .finish()
    }
}

impl LeaseClient {
    pub fn new(s: &LeaseSettings, store: Arc<dyn ObjectStore>) -> LeaseClient {
        LeaseClient {
            store,
            layout: Layout::new(&s.canonical_id),
            canonical_id: s.canonical_id.clone(),
            node_id: s.node_id.clone(),
            policy: s.policy.clone(),
            ttl: s.ttl,
            skew_margin: Self::default_skew_margin(s.ttl),
            session: format!("{:016x}", rand::random::<u64>()),
        }
    }

    /// A tenth of the TTL, between 1 s and 5 s (3 s for the default 30 s TTL).
    pub fn default_skew_margin(ttl: Duration) -> Duration {
        (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(5))
    }

    pub fn lease_seconds(&self) -> u64 {
        self.ttl.as_secs().max(1)
    }

    pub(super) fn margin(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.skew_margin).unwrap_or_default()
    }

    /// Whether this node may act as the holder of `lease` at `now`: it names
    /// this node, is not released, and `now` is more than `skew_margin` before
    /// `expires_at`. (Sessions are the keeper's business, not checked here.)
    pub fn holder_valid(&self, lease: &Lease, now: DateTime<Utc>) -> bool {
        lease.primary_node_id == self.node_id
            && !lease.is_released()
            && now < self.holder_deadline(lease)
    }

    /// The moment the holder must consider `lease` lost: `expires_at - skew_margin`.
    pub fn holder_deadline(&self, lease: &Lease) -> DateTime<Utc> {
        lease.expires_at - self.margin()
    }

    /// Whether any node other than the holder must consider `lease` held at
    /// `now`: not released, and `now` no later than `skew_margin` after
    /// `expires_at`.
    pub fn seen_held(&self, lease: &Lease, now: DateTime<Utc>) -> bool {
        !lease.is_released() && now <= lease.expires_at + self.margin()
    }

    /// Whether the policy lets this node take a lease nobody holds.
    pub fn may_take(&self) -> Result<(), String> {
        match &self.policy {
            Policy::Disabled => Err("leadership is disabled on this node".into()),
            Policy::Pinned { primary } if *primary != self.node_id => Err(format!(
                "PRIMARY_NODE_ID pins the lease to {primary}; this node ({}) never takes it",
                self.node_id
            )),
            Policy::Pinned { .. } => Ok(()),
            Policy::Auto { candidate: true } | Policy::Follow { .. } => Ok(()),
            Policy::Auto { candidate: false } => Err(format!(
                "LEADERSHIP_CANDIDATE=0: this node ({}) never takes the lease by itself",
                self.node_id
            )),
        }
    }

    /// Whether the policy lets `node` hold the lease at all (select, hand-over,
    /// adopting a lease written for this node).
    pub fn may_hold(&self, node: &str) -> Result<(), LeaseError> {
        validate_node_id(node).map_err(LeaseError::NotAllowed)?;
        match &self.policy {
            Policy::Disabled => Err(LeaseError::Disabled),
            Policy::Pinned { primary } if primary != node => Err(LeaseError::NotAllowed(format!(
                "PRIMARY_NODE_ID pins the lease to {primary}; {node} may not hold it (change PRIMARY_NODE_ID on every node first)"
            ))),
            _ => Ok(()),
        }
    }

    /// The lease and its ETag; `None` if there is none.
    pub async fn read(&self) -> Result<Option<Versioned>, LeaseError> {
        let key = self.layout.lease();
        match self.store.get(&key).await {
            Ok(got) => Ok(Some(Versioned {
                lease: Lease::parse(&key, &got.body, &self.canonical_id)?,
                etag: got.etag,
            })),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A fresh lease for `holder` at `epoch`, starting now, keeping the unknown
    /// fields of `base` (minus release marks and session).
    pub(super) fn fresh(
        &self,
        holder: &str,
        epoch: u64,
        base: Option<&Lease>,
        session: Option<&str>,
    ) -> Lease {
        let now = Utc::now();
        // Rounded up to whole seconds: never shorter than lease_seconds.
        let issued = now.timestamp() + i64::from(now.timestamp_subsec_nanos() > 0);
        let issued_at = DateTime::from_timestamp(issued, 0).unwrap_or(now);
        let secs = self.lease_seconds();
        let mut extra = base.map(|b| b.extra.clone()).unwrap_or_default();
        for k in [
            SESSION_FIELD,
            RELEASED_BY_FIELD,
            RELEASED_AT_FIELD,
            ROLLBACK_FIELD,
        ] {
            extra.remove(k);
        }
        if let Some(s) = session {
            extra.insert(SESSION_FIELD.into(), Value::String(s.to_string()));
        }
        Lease {
            canonical_id: self.canonical_id.clone(),
            primary_node_id: holder.to_string(),
            issued_at,
            expires_at: issued_at + chrono::Duration::seconds(secs as i64),
            lease_seconds: secs,
            epoch,
            policy: self.policy.name().to_string(),
            issued_by: self.node_id.clone(),
            needs_ui_selection: None,
            extra,
        }
    }

    pub(super) async fn put(&self, lease: &Lease, mode: PutMode) -> Result<String, StoreError> {
        self.store
            .put(&self.layout.lease(), Bytes::from(lease.to_json()), mode)
            .await
    }

    /// Takes the lease if nobody holds it and the policy allows: creates it at
    /// epoch 1 if absent, takes an expired or released one at `epoch + 1`,
    /// adopts one written for this node (select, hand-over) at its epoch, and
    /// reclaims one still carrying this client's own session at `epoch + 1`.
    /// A valid lease of another node, or of another session of this node, is
    /// left alone ([`Acquire::HeldBy`]). Never overwrites a malformed lease.
    pub async fn try_acquire(&self) -> Result<Acquire, LeaseError> {
        self.acquire(false).await
    }

    /// [`LeaseClient::try_acquire`] for a daemon that has just started: a valid
    /// lease naming this node under another session is taken over at once
    /// (`epoch + 1`): it is this node's previous run. (Two live daemons with the
    /// same node id are a configuration error; the one that starts last wins,
    /// and the other one's next renewal fails.)
    pub async fn try_acquire_at_start(&self) -> Result<Acquire, LeaseError> {
        self.acquire(true).await
    }

    pub(super) async fn acquire(&self, at_start: bool) -> Result<Acquire, LeaseError> {
        if self.policy == Policy::Disabled {
            return Ok(Acquire::Disabled);
        }
        for _ in 0..RACE_ROUNDS {
            let now = Utc::now();
            let current = self.read().await?;
            let (next, how, mode) = match &current {
                None => {
                    if let Err(why) = self.may_take() {
                        return Ok(Acquire::NotAllowed { current, why });
                    }
                    let lease = self.fresh(&self.node_id, 1, None, Some(&self.session));
                    (lease, How::Created, PutMode::CreateOnly)
                }
                Some(v) if self.seen_held(&v.lease, now) => {
                    let l = &v.lease;
                    if l.primary_node_id != self.node_id {
                        return Ok(Acquire::HeldBy(v.clone()));
                    }
                    let mine = l.session() == Some(self.session.as_str());
                    let how = match l.session() {
                        // Written by `migrate --rollback` for the old tool
                        // on this machine: a stray mount must not take the
                        // project back from it (docs/MIGRATION.md).
                        None if l.extra.contains_key(ROLLBACK_FIELD) => {
                            return Ok(Acquire::HeldBy(v.clone()))
                        }
                        None => How::Adopted,
                        Some(_) if mine || at_start => How::Reclaimed,
                        Some(_) => return Ok(Acquire::HeldBy(v.clone())),
                    };
                    if let Err(e) = self.may_hold(&self.node_id) {
                        return Ok(Acquire::NotAllowed {
                            current: current.clone(),
                            why: e.to_string(),
                        });
                    }
                    let mut next = if how == How::Adopted {
                        self.fresh(&self.node_id, l.epoch, Some(l), Some(&self.session))
                    } else {
                        self.fresh(&self.node_id, l.epoch + 1, Some(l), Some(&self.session))
                    };
                    if how == How::Adopted {
                        next.needs_ui_selection = l.needs_ui_selection;
                    }
                    (next, how, PutMode::IfMatch(v.etag.clone()))
                }
                Some(v) => {
                    if let Err(why) = self.may_take() {
                        return Ok(Acquire::NotAllowed { current, why });
                    }
                    let l = &v.lease;
                    let next = self.fresh(&self.node_id, l.epoch + 1, Some(l), Some(&self.session));
                    let how = if l.primary_node_id == self.node_id {
                        How::Reclaimed
                    } else {
                        How::TookOver {
                            from: l.primary_node_id.clone(),
                        }
                    };
                    (next, how, PutMode::IfMatch(v.etag.clone()))
                }
            };
            match self.put(&next, mode).await {
                Ok(etag) => {
                    let prev = current.as_ref().map(|v| &v.lease);
                    if how != How::Adopted {
                        let (event, reason) = match (&how, prev) {
                            (How::Created, _) => ("acquire", "no lease yet".to_string()),
                            (_, Some(p)) if p.is_released() => (
                                "takeover",
                                format!("released by {}", p.released_by().unwrap_or("?")),
                            ),
                            (How::Reclaimed, Some(p)) if self.seen_held(p, now) => {
                                ("reclaim", "held by an earlier run of this node".to_string())
                            }
                            (_, Some(p)) => {
                                ("takeover", format!("expired at {}", fmt_time(p.expires_at)))
                            }
                            (_, None) => ("acquire", String::new()),
                        };
                        self.audit(event, prev, &next, &reason).await;
                    }
                    return Ok(Acquire::Acquired {
                        held: Versioned { lease: next, etag },
                        how,
                    });
                }
                // Someone else wrote first: look again.
                Err(StoreError::PreconditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        match self.read().await? {
            Some(v) => Ok(Acquire::HeldBy(v)),
            None => Err(StoreError::PreconditionFailed {
                key: self.layout.lease(),
            }
            .into()),
        }
    }

    /// Extends a lease this client holds, same epoch. Fails with
    /// [`LeaseError::Lost`] if anyone else changed it since: the caller must
    /// stop writing at once.
    pub async fn renew(&self, held: &Versioned) -> Result<Versioned, LeaseError> {
        let mut etag = held.etag.clone();
        for _ in 0..RACE_ROUNDS {
            let mut next = self.fresh(
                &self.node_id,
                held.lease.epoch,
                Some(&held.lease),
                Some(&self.session),
            );
            next.needs_ui_selection = held.lease.needs_ui_selection;
            match self.put(&next, PutMode::IfMatch(etag.clone())).await {
                Ok(etag) => return Ok(Versioned { lease: next, etag }),
                Err(StoreError::PreconditionFailed { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            // Changed under us. Still ours at the same epoch means one of our own
            // renewals succeeded although we never saw its answer (a timeout):
            // carry on from that version. Anything else is the fencing signal.
            let current = match self.read().await {
                Ok(c) => c,
                Err(e @ (LeaseError::Malformed { .. } | LeaseError::ForeignProject { .. })) => {
                    return Err(self.lost(format!("the lease was overwritten: {e}"), None));
                }
                Err(e) => return Err(e),
            };
            match current {
                Some(v)
                    if v.lease.primary_node_id == self.node_id
                        && v.lease.session() == Some(self.session.as_str())
                        && v.lease.epoch == held.lease.epoch
                        && !v.lease.is_released() =>
                {
                    etag = v.etag;
                }
                other => return Err(self.lost_to(&held.lease, other.map(|v| v.lease))),
            }
        }
        Err(StoreError::PreconditionFailed {
            key: self.layout.lease(),
        }
        .into())
    }

    pub(super) fn lost(&self, reason: String, current: Option<Lease>) -> LeaseError {
        LeaseError::Lost {
            reason,
            current: current.map(Box::new),
        }
    }

    pub(super) fn lost_to(&self, held: &Lease, current: Option<Lease>) -> LeaseError {
        let reason = match &current {
            None => "the lease was deleted".to_string(),
            Some(c) if c.primary_node_id == self.node_id && c.is_released() => format!(
                "the lease was released by {}",
                c.released_by().unwrap_or("?")
            ),
            Some(c) if c.primary_node_id == self.node_id && c.epoch == held.epoch => {
                "another daemon with this node id renewed it (are two nodes using the same MEMBRIDGE_NODE_ID?)".to_string()
            }
            Some(c) => format!(
                "the lease now names {} (was {} at epoch {})",
                c.describe(),
                held.primary_node_id,
                held.epoch
            ),
        };
        self.lost(reason, current)
    }

    /// Takes the lease this client holds again at `epoch` (above its own):
    /// the manifest moved past the lease's epoch, so this tenure needs one
    /// above both (issue 15: a lease rewritten by the old tool with its own
    /// count). [`LeaseError::Lost`] if anyone else changed it since.
    pub async fn raise_epoch(&self, held: &Versioned, epoch: u64) -> Result<Versioned, LeaseError> {
        let mut next = self.fresh(&self.node_id, epoch, Some(&held.lease), Some(&self.session));
        next.needs_ui_selection = held.lease.needs_ui_selection;
        match self.put(&next, PutMode::IfMatch(held.etag.clone())).await {
            Ok(etag) => {
                let reason = format!(
                    "the manifest was at a later epoch than the lease's {}",
                    held.lease.epoch
                );
                self.audit("epoch", Some(&held.lease), &next, &reason).await;
                Ok(Versioned { lease: next, etag })
            }
            Err(StoreError::PreconditionFailed { .. }) => {
                let current = self.read().await.ok().flatten().map(|v| v.lease);
                Err(self.lost_to(&held.lease, current))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives up a lease this node holds so that another node may take it at
    /// once: `expires_at` becomes now and the lease is marked released; the
    /// epoch is kept (the next holder writes `epoch + 1`). The caller must have
    /// stopped writing first.
    pub async fn release(&self, held: &Versioned) -> Result<Versioned, LeaseError> {
        if held.lease.primary_node_id != self.node_id {
            return Err(LeaseError::NotAllowed(format!(
                "the lease names {}, not this node ({})",
                held.lease.primary_node_id, self.node_id
            )));
        }
        let now = Utc::now();
        let mut next = held.lease.clone();
        next.expires_at = DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now);
        next.issued_by = self.node_id.clone();
        next.extra.remove(SESSION_FIELD);
        next.extra.insert(
            RELEASED_BY_FIELD.into(),
            Value::String(self.node_id.clone()),
        );
        next.extra
            .insert(RELEASED_AT_FIELD.into(), Value::from(now.timestamp()));
        match self.put(&next, PutMode::IfMatch(held.etag.clone())).await {
            Ok(etag) => {
                self.audit("release", Some(&held.lease), &next, "stepped down")
                    .await;
                Ok(Versioned { lease: next, etag })
            }
            Err(StoreError::PreconditionFailed { .. }) => {
                let current = self.read().await.ok().flatten().map(|v| v.lease);
                Err(self.lost_to(&held.lease, current))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `membridge leadership release`: releases the lease if it names this node
    /// (whatever session holds it: the operator on this node asked).
    pub async fn release_own(&self) -> Result<Release, LeaseError> {
        if self.policy == Policy::Disabled {
            return Err(LeaseError::Disabled);
        }
        for _ in 0..RACE_ROUNDS {
            let Some(v) = self.read().await? else {
                return Ok(Release::NotPrimary(None));
            };
            if v.lease.primary_node_id != self.node_id {
                return Ok(Release::NotPrimary(Some(v.lease)));
            }
            if v.lease.is_released() {
                return Ok(Release::AlreadyReleased(v));
            }
            match self.release(&v).await {
                Ok(v) => return Ok(Release::Released(v)),
                // The daemon renewed it meanwhile: read again.
                Err(LeaseError::Lost { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::PreconditionFailed {
            key: self.layout.lease(),
        }
        .into())
    }

    /// Writes one audit entry for a change from `prev` to `next`. A failure is
    /// logged, not returned: the change itself has happened.
    pub(super) async fn audit(
        &self,
        event: &str,
        prev: Option<&Lease>,
        next: &Lease,
        reason: &str,
    ) {
        let now = Utc::now();
        let mut entry = match serde_json::to_value(next) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let extra = [
            ("event", Value::from(event)),
            ("timestamp", Value::from(fmt_time(now))),
            (
                "from",
                prev.map_or(Value::Null, |p| Value::from(p.primary_node_id.as_str())),
            ),
            ("to", Value::from(next.primary_node_id.as_str())),
            (
                "prev_epoch",
                prev.map_or(Value::Null, |p| Value::from(p.epoch)),
            ),
            ("reason", Value::from(reason)),
            ("by", Value::from(self.node_id.as_str())),
        ];
        for (k, v) in extra {
            entry.insert(k.to_string(), v);
        }
        let body = Bytes::from(serde_json::to_vec_pretty(&entry).unwrap_or_default());
        // The old tool's key has one-second resolution: two changes by one node
        // within a second get a numbered key rather than overwrite each other.
        let base = self.layout.audit_entry(now, &self.node_id);
        for n in 1..=5 {
            let key = if n == 1 {
                base.clone()
            } else {
                format!("{}-{n}.json", base.trim_end_matches(".json"))
            };
            match self
                .store
                .put(&key, body.clone(), PutMode::CreateOnly)
                .await
            {
                Ok(_) => return,
                Err(StoreError::PreconditionFailed { .. }) => continue,
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "could not write the lease audit entry");
                    return;
                }
            }
        }
        tracing::warn!(key = %base, "could not write the lease audit entry: too many changes within one second");
    }
}

/// Node ids as config accepts them: 1-128 chars of A-Z a-z 0-9 - _ .
pub(super) fn validate_node_id(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 128
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{n:?} is not a node id (1-128 chars of A-Z a-z 0-9 - _ .)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_margin_scales_with_the_ttl() {
        let m = LeaseClient::default_skew_margin;
        assert_eq!(m(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(m(Duration::from_secs(30)), Duration::from_secs(3));
        assert_eq!(m(Duration::from_secs(3600)), Duration::from_secs(5));
    }
}
