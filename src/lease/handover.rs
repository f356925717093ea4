//! The hand-over side of [`LeaseClient`] (docs/ARCHITECTURE.md §3): `select`,
//! hand-over requests and their answers, and waiting until the target takes
//! writes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::remote::{PutMode, StoreError};

use super::client::RACE_ROUNDS;
use super::time::fmt_time;
use super::*;

impl LeaseClient {
    /// Writes the lease for `target` at `epoch + 1` if nobody holds a valid one
    /// (absent, expired past the margin, or released): takes effect at once.
    /// If `target` already holds it, nothing changes. If another node holds
    /// it, nothing is written: that node has to hand over.
    pub async fn select(&self, target: &str) -> Result<Select, LeaseError> {
        self.may_hold(target)?;
        for _ in 0..RACE_ROUNDS {
            let now = Utc::now();
            let current = self.read().await?;
            let (next, mode) = match &current {
                None => (self.fresh(target, 1, None, None), PutMode::CreateOnly),
                Some(v) if self.seen_held(&v.lease, now) => {
                    if v.lease.primary_node_id == target {
                        return Ok(Select::Unchanged(v.clone()));
                    }
                    return Ok(Select::NeedsHandover(v.clone()));
                }
                Some(v) => (
                    self.fresh(target, v.lease.epoch + 1, Some(&v.lease), None),
                    PutMode::IfMatch(v.etag.clone()),
                ),
            };
            match self.put(&next, mode).await {
                Ok(etag) => {
                    let prev = current.as_ref().map(|v| &v.lease);
                    let reason = match prev {
                        None => "no lease yet".to_string(),
                        Some(p) if p.is_released() => "the lease was released".to_string(),
                        Some(p) => format!("the lease expired at {}", fmt_time(p.expires_at)),
                    };
                    self.audit("select", prev, &next, &reason).await;
                    return Ok(Select::Changed(Versioned { lease: next, etag }));
                }
                Err(StoreError::PreconditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::PreconditionFailed {
            key: self.layout.lease(),
        }
        .into())
    }

    /// `leadership select TARGET --force`: like [`LeaseClient::select`], but
    /// a valid lease held by an old-tool node (see
    /// [`super::oldtool::old_tool_holder`]: it can neither hand over nor be
    /// waited for, its lease lasts an hour) is replaced at `epoch + 1` by
    /// compare-and-swap on the ETag it was read with, and audited as
    /// `select-force`. A lease held by a membridge node is never forced: that
    /// node may be writing (use `select`, which asks it to hand over).
    pub async fn select_force(&self, target: &str) -> Result<Select, LeaseError> {
        self.may_hold(target)?;
        for _ in 0..RACE_ROUNDS {
            let v = match self.select(target).await? {
                Select::NeedsHandover(v) => v,
                done => return Ok(done),
            };
            let now = Utc::now();
            let old_tool =
                super::oldtool::old_tool_holder(self.store.as_ref(), &self.layout, &v.lease, now)
                    .await?;
            if !old_tool {
                return Err(LeaseError::NotAllowed(format!(
                    "--force replaces only a lease held by an old-tool node; {} holds it as a membridge node (its lease carries a membridge session or it publishes a heartbeat): run `membridge leadership select {target}` without --force, which asks it to hand over",
                    v.lease.describe()
                )));
            }
            let next = self.fresh(target, v.lease.epoch + 1, Some(&v.lease), None);
            match self.put(&next, PutMode::IfMatch(v.etag.clone())).await {
                Ok(etag) => {
                    let reason = format!(
                        "forced by {}: replaced a lease held by {}, an old-tool node that publishes no membridge history ({} s left of {} s)",
                        self.node_id,
                        v.lease.primary_node_id,
                        v.lease.remaining(now).num_seconds(),
                        v.lease.lease_seconds
                    );
                    self.audit("select-force", Some(&v.lease), &next, &reason)
                        .await;
                    return Ok(Select::Changed(Versioned { lease: next, etag }));
                }
                // Changed since it was read (the old tool renewed, a node
                // took it): look again.
                Err(StoreError::PreconditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::PreconditionFailed {
            key: self.layout.lease(),
        }
        .into())
    }

    /// `migrate --rollback`: a lease the old tool accepts as its own, naming
    /// `target` for `seconds` (its policy, no membridge session), at
    /// `epoch + 1`, by compare-and-swap; audited as `rollback`. Refused while
    /// a membridge node holds a valid lease (it must unmount first: it would
    /// keep writing).
    pub async fn hand_to_old_tool(
        &self,
        target: &str,
        seconds: u64,
    ) -> Result<Versioned, LeaseError> {
        validate_node_id(target).map_err(LeaseError::NotAllowed)?;
        for _ in 0..RACE_ROUNDS {
            let now = Utc::now();
            let current = self.read().await?;
            if let Some(v) = &current {
                let membridge_holder = self.seen_held(&v.lease, now)
                    && !super::oldtool::old_tool_holder(
                        self.store.as_ref(),
                        &self.layout,
                        &v.lease,
                        now,
                    )
                    .await?;
                if membridge_holder {
                    return Err(LeaseError::NotAllowed(format!(
                        "{} holds the lease as a membridge primary: unmount it first (membridge unmount, or run the rollback there)",
                        v.lease.describe()
                    )));
                }
            }
            let epoch = current.as_ref().map_or(1, |v| v.lease.epoch + 1);
            let mut next = self.fresh(target, epoch, current.as_ref().map(|v| &v.lease), None);
            next.policy = super::oldtool::OLD_TOOL_POLICY.to_string();
            next.extra.insert(ROLLBACK_FIELD.into(), Value::Bool(true));
            next.lease_seconds = seconds;
            next.expires_at = next.issued_at + chrono::Duration::seconds(seconds as i64);
            let mode = match &current {
                Some(v) => PutMode::IfMatch(v.etag.clone()),
                None => PutMode::CreateOnly,
            };
            match self.put(&next, mode).await {
                Ok(etag) => {
                    self.audit(
                        "rollback",
                        current.as_ref().map(|v| &v.lease),
                        &next,
                        "migrate --rollback: the project goes back to the old tool",
                    )
                    .await;
                    return Ok(Versioned { lease: next, etag });
                }
                Err(StoreError::PreconditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::PreconditionFailed {
            key: self.layout.lease(),
        }
        .into())
    }

    /// The primary's side of a graceful hand-over, once it has flushed and
    /// published: writes the lease for `target` at `epoch + 1` if it still
    /// holds `held`, and withdraws `handover.json`. The target adopts it with
    /// its next poll. On [`LeaseError::Lost`] nothing was written.
    pub async fn hand_over(&self, held: &Versioned, target: &str) -> Result<Versioned, LeaseError> {
        self.hand_over_for(held, target, "requested by select")
            .await
    }

    /// [`LeaseClient::hand_over`], with the reason for the audit entry.
    pub async fn hand_over_for(
        &self,
        held: &Versioned,
        target: &str,
        reason: &str,
    ) -> Result<Versioned, LeaseError> {
        self.may_hold(target)?;
        let next = self.fresh(target, held.lease.epoch + 1, Some(&held.lease), None);
        match self.put(&next, PutMode::IfMatch(held.etag.clone())).await {
            Ok(etag) => {
                self.audit("handover", Some(&held.lease), &next, reason)
                    .await;
                if let Err(e) = self.store.delete(&self.layout.handover()).await {
                    tracing::warn!(error = %e, "could not withdraw the hand-over request");
                }
                Ok(Versioned { lease: next, etag })
            }
            Err(StoreError::PreconditionFailed { .. }) => {
                let current = self.read().await.ok().flatten().map(|v| v.lease);
                Err(self.lost_to(&held.lease, current))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `handover.json`, if any.
    pub async fn read_handover(&self) -> Result<Option<Handover>, LeaseError> {
        let key = self.layout.handover();
        match self.store.get(&key).await {
            Ok(got) => parse_handover(&key, &got.body, got.etag).map(Some),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// `handover.json` unless it still has `etag` (the keeper's cheap poll).
    pub async fn watch_handover(&self, etag: Option<&str>) -> Result<Watched, LeaseError> {
        let key = self.layout.handover();
        let got = match etag {
            Some(e) => self.store.get_if_none_match(&key, e).await,
            None => self.store.get(&key).await.map(Some),
        };
        match got {
            Ok(Some(got)) => parse_handover(&key, &got.body, got.etag).map(Watched::Request),
            Ok(None) | Err(StoreError::NotModified { .. }) => Ok(Watched::Unchanged),
            Err(StoreError::NotFound { .. }) => Ok(Watched::Absent),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the holder of `epoch` should act on `h` at `now`: current (see
    /// [`Handover::is_current`]), not answered, and to another node.
    pub fn should_honour(&self, h: &Handover, epoch: u64, now: DateTime<Utc>) -> bool {
        h.to != self.node_id && h.refused.is_none() && h.is_current(epoch, self.ttl, now)
    }

    /// The primary declines `h` (read with its ETag): the request is kept,
    /// answered, so that the requester learns why and nobody acts on it.
    /// `Ok(false)` if it was replaced or withdrawn meanwhile.
    pub async fn refuse_handover(&self, h: &Handover, why: &str) -> Result<bool, LeaseError> {
        let Some(etag) = h.etag.clone() else {
            return Ok(false);
        };
        let mut answered = h.clone();
        answered.refused = Some(why.to_string());
        let body = serde_json::to_vec_pretty(&answered).expect("a request serializes");
        match self
            .store
            .put(&self.layout.handover(), body.into(), PutMode::IfMatch(etag))
            .await
        {
            Ok(_) => Ok(true),
            Err(StoreError::PreconditionFailed { .. } | StoreError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// How long `leadership select` waits for a hand-over: one TTL (a
    /// primary too old to watch `handover.json` closely sees the request at
    /// its next renewal, TTL/3 at most) plus [`HANDOVER_GRACE`].
    pub fn select_wait(&self) -> Duration {
        self.ttl + HANDOVER_GRACE
    }

    /// `membridge leadership select TARGET`: [`LeaseClient::select`]; if another
    /// node holds a valid lease, writes `handover.json` and waits up to `wait`
    /// until the lease names `target` (the primary handed over) or nobody holds
    /// it any more (then selects at once). `progress` gets one line at a time.
    /// The request is withdrawn when this returns. The target takes writes a
    /// moment later: [`LeaseClient::wait_taken_over`].
    pub async fn request_handover(
        &self,
        target: &str,
        wait: Duration,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Versioned, LeaseError> {
        self.may_hold(target)?;
        if let Some(why) = self.no_fresh_heartbeat(target).await {
            progress(&format!(
                "warning: {why}; if {target} does not take up the lease, it expires after {} s and another node may take it",
                self.lease_seconds()
            ));
        }
        let current = match self.select(target).await? {
            Select::Changed(v) => {
                progress(&format!(
                    "nobody held a valid lease: {target} is primary now (epoch {})",
                    v.lease.epoch
                ));
                return Ok(v);
            }
            Select::Unchanged(v) => {
                progress(&format!(
                    "{target} is primary already (epoch {})",
                    v.lease.epoch
                ));
                return Ok(v);
            }
            Select::NeedsHandover(v) => v,
        };
        // An old-tool node never reads handover.json: waiting would only
        // time out (docs/MIGRATION.md, "Old-tool nodes and the lease").
        if super::oldtool::old_tool_holder(
            self.store.as_ref(),
            &self.layout,
            &current.lease,
            Utc::now(),
        )
        .await?
        {
            return Err(LeaseError::NotAllowed(format!(
                "{} is an old-tool node ({} s left of its lease): it cannot hand over; fix its settings (docs/MIGRATION.md), then `membridge leadership select {target} --force`",
                current.lease.describe(),
                current.lease.remaining(Utc::now()).num_seconds()
            )));
        }
        let request = Handover::new(target, &self.node_id, current.lease.epoch);
        self.ask(request, &current.lease, wait, progress).await
    }

    /// Writes `request`, waits for its outcome, withdraws it.
    pub(super) async fn ask(
        &self,
        request: Handover,
        holder: &Lease,
        wait: Duration,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Versioned, LeaseError> {
        let body = serde_json::to_vec_pretty(&request).expect("a request serializes");
        self.store
            .put(&self.layout.handover(), body.into(), PutMode::Overwrite)
            .await?;
        let what = if request.follow_idle_s.is_some() {
            "hand over if idle"
        } else {
            "flush and hand over"
        };
        progress(&format!(
            "asked {} (epoch {}) to {what} to {}; waiting up to {} s",
            holder.primary_node_id,
            holder.epoch,
            request.to,
            wait.as_secs()
        ));
        let result = self.wait_for(&request, holder, wait, progress).await;
        if let Err(e) = self.store.delete(&self.layout.handover()).await {
            tracing::warn!(error = %e, "could not withdraw the hand-over request");
        }
        result
    }

    /// `membridge leadership follow` (policy `follow`): make this node the
    /// primary if the primary has been idle for `idle` (no transaction
    /// committed and the lease not taken within it). The requester looks at
    /// the primary's heartbeat first (no request to a primary known to be
    /// busy); the primary decides, after it has stopped taking writes, so a
    /// write that slips in between keeps the lease where it is.
    pub async fn request_follow(
        &self,
        idle: Duration,
        wait: Duration,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Follow, LeaseError> {
        let me = self.node_id.clone();
        self.may_hold(&me)?;
        let current = match self.select(&me).await? {
            Select::Changed(v) => return Ok(Follow::Moved(v)),
            Select::Unchanged(v) => return Ok(Follow::Already(v)),
            Select::NeedsHandover(v) => v,
        };
        let primary = current.lease.primary_node_id.clone();
        if let Some(reason) = self.busy_by_heartbeat(&primary, idle).await {
            return Ok(Follow::Busy { primary, reason });
        }
        let mut request = Handover::new(&me, &me, current.lease.epoch);
        request.follow_idle_s = Some(idle.as_secs());
        match self.ask(request, &current.lease, wait, progress).await {
            Ok(v) => Ok(Follow::Moved(v)),
            Err(LeaseError::HandoverRefused { primary, reason }) => {
                Ok(Follow::Busy { primary, reason })
            }
            Err(e) => Err(e),
        }
    }

    /// Why `primary` is not to be asked, by its last heartbeat, if it is not:
    /// it is busy, or cannot say (no heartbeat, or one from a version that
    /// does not report writes and would hand over even if busy).
    pub(super) async fn busy_by_heartbeat(&self, primary: &str, idle: Duration) -> Option<String> {
        let hb = match self.store.get(&self.layout.node(primary)).await {
            Ok(got) => serde_json::from_slice::<Heartbeat>(&got.body).ok(),
            Err(_) => None,
        };
        let Some(hb) = hb else {
            return Some("it has no readable heartbeat, so whether it is idle is unknown".into());
        };
        if hb.primary_since.is_none() {
            return Some(format!(
                "its membridge ({}) does not report its writes, so whether it is idle is unknown",
                hb.version
            ));
        }
        hb.busy_since(idle, Utc::now())
    }

    /// Why `node` looks absent (no heartbeat, or a stale one), if it does.
    pub async fn no_fresh_heartbeat(&self, node: &str) -> Option<String> {
        let got = match self.store.get(&self.layout.node(node)).await {
            Ok(got) => got,
            Err(StoreError::NotFound { .. }) => {
                return Some(format!("{node} has never written a heartbeat"))
            }
            Err(_) => return None,
        };
        let hb: Heartbeat = serde_json::from_slice(&got.body).ok()?;
        let now = Utc::now();
        hb.is_stale(now, DEFAULT_HEARTBEAT_INTERVAL).then(|| {
            format!(
                "{node} was last seen {} s ago",
                (now - hb.last_seen).num_seconds()
            )
        })
    }

    pub(super) async fn wait_for(
        &self,
        request: &Handover,
        holder: &Lease,
        wait: Duration,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Versioned, LeaseError> {
        let target = request.to.as_str();
        let start = tokio::time::Instant::now();
        let mut last_note = start;
        let mut holder = holder.clone();
        loop {
            tokio::time::sleep(HANDOVER_POLL).await;
            match self.select(target).await {
                Ok(Select::Unchanged(v)) => {
                    progress(&format!(
                        "{} handed over: {target} holds the lease (epoch {})",
                        holder.primary_node_id, v.lease.epoch
                    ));
                    return Ok(v);
                }
                Ok(Select::Changed(v)) => {
                    progress(&format!(
                        "the lease of {} ran out: {target} holds it now (epoch {})",
                        holder.primary_node_id, v.lease.epoch
                    ));
                    return Ok(v);
                }
                Ok(Select::NeedsHandover(v)) => {
                    if v.lease.primary_node_id != holder.primary_node_id
                        || v.lease.epoch != holder.epoch
                    {
                        progress(&format!("the lease moved to {}", v.lease.describe()));
                        holder = v.lease;
                    }
                }
                // A slow or flaky bucket: keep waiting until the deadline.
                Err(LeaseError::Store(e)) if e.is_transient() => {
                    progress(&format!("cannot read the lease: {e}"));
                }
                Err(e) => return Err(e),
            }
            // Only a follow request is ever declined.
            if request.follow_idle_s.is_some() {
                if let Ok(Some(h)) = self.read_handover().await {
                    if let (Some(reason), true) = (&h.refused, h.at == request.at) {
                        return Err(LeaseError::HandoverRefused {
                            primary: holder.primary_node_id.clone(),
                            reason: reason.clone(),
                        });
                    }
                }
            }
            let waited = start.elapsed();
            if waited >= wait {
                return Err(LeaseError::HandoverTimeout {
                    primary: holder.primary_node_id.clone(),
                    target: target.to_string(),
                    waited_s: waited.as_secs(),
                });
            }
            if last_note.elapsed() >= Duration::from_secs(5) {
                last_note = tokio::time::Instant::now();
                progress(&format!(
                    "still waiting for {} (epoch {}, lease expires in {} s)",
                    holder.primary_node_id,
                    holder.epoch,
                    holder.remaining(Utc::now()).num_seconds().max(0)
                ));
            }
        }
    }

    /// After the lease came to `target` at `epoch`: waits up to `wait` until
    /// it takes writes: the manifest's epoch reaches `epoch` (the new
    /// primary's last step before it accepts writes, DESIGN §4) and its
    /// heartbeat, written at each role change, says it is primary.
    pub async fn wait_taken_over(
        &self,
        target: &str,
        epoch: u64,
        wait: Duration,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Duration, LeaseError> {
        let start = tokio::time::Instant::now();
        self.wait_manifest_epoch(target, epoch, wait, progress)
            .await?;
        let key = self.layout.node(target);
        loop {
            if let Ok(got) = self.store.get(&key).await {
                if let Ok(hb) = serde_json::from_slice::<Heartbeat>(&got.body) {
                    if hb.role == "primary" && hb.epoch.is_some_and(|e| e >= epoch) {
                        progress(&format!(
                            "{target} is primary (epoch {epoch}) and takes writes"
                        ));
                        return Ok(start.elapsed());
                    }
                }
            }
            if start.elapsed() >= wait {
                return Err(LeaseError::NotTakenOver {
                    target: target.to_string(),
                    epoch,
                    waited_s: start.elapsed().as_secs(),
                    manifest_epoch: Some(epoch),
                });
            }
            tokio::time::sleep(HANDOVER_POLL).await;
        }
    }

    pub(super) async fn wait_manifest_epoch(
        &self,
        target: &str,
        epoch: u64,
        wait: Duration,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Duration, LeaseError> {
        let key = self.layout.manifest();
        let start = tokio::time::Instant::now();
        let mut etag: Option<String> = None;
        let mut last = None;
        loop {
            let got = match &etag {
                Some(e) => self.store.get_if_none_match(&key, e).await,
                None => self.store.get(&key).await.map(Some),
            };
            match got {
                Ok(Some(got)) => {
                    let m = crate::manifest::Manifest::parse(&key, &got.body, &self.canonical_id)
                        .map_err(|e| LeaseError::Malformed {
                        key: key.clone(),
                        why: e.to_string(),
                    })?;
                    etag = Some(got.etag);
                    last = Some(m.epoch);
                    if m.epoch >= epoch {
                        return Ok(start.elapsed());
                    }
                }
                Ok(None) | Err(StoreError::NotModified { .. } | StoreError::NotFound { .. }) => {}
                Err(e) if e.is_transient() => progress(&format!("cannot read the manifest: {e}")),
                Err(e) => return Err(e.into()),
            }
            if start.elapsed() >= wait {
                return Err(LeaseError::NotTakenOver {
                    target: target.to_string(),
                    epoch,
                    waited_s: start.elapsed().as_secs(),
                    manifest_epoch: last,
                });
            }
            tokio::time::sleep(HANDOVER_POLL).await;
        }
    }
}

fn parse_handover(key: &str, body: &[u8], etag: String) -> Result<Handover, LeaseError> {
    let mut h: Handover = serde_json::from_slice(body).map_err(|e| LeaseError::Malformed {
        key: key.to_string(),
        why: e.to_string(),
    })?;
    h.etag = Some(etag);
    Ok(h)
}
