//! The leadership lease (docs/ARCHITECTURE.md §3): who is primary, under which epoch, until when.
//!
//! `projects/<cid>/leadership/lease.json` keeps the old hook-based tool's fields
//! so that both tools can read it during a migration, but membridge changes it
//! only by conditional writes: created with `If-None-Match: *`, and renewed,
//! taken, released or handed over with `If-Match: <etag>`. Of several nodes
//! racing for it exactly one wins; a node whose conditional write fails has lost
//! the lease, and that is the fencing signal the daemon acts on.
//!
//! - [`Lease`]: the object, parsed strictly (a malformed lease or one of another
//!   project is a typed error and is never overwritten) and written back with
//!   every field it had, including fields only an old tool knows.
//! - [`LeaseClient`]: one node's operations on it, each one conditional write
//!   plus an audit entry under `leadership/audit/`.
//! - [`LeaseKeeper`]: the task the daemon runs: takes the lease when the policy
//!   allows, renews it every TTL/3, watches `handover.json` (every 0.5 s while
//!   holding, so a hand-over starts at once), and reports [`LeaseState`] on a
//!   watch channel.
//! - Hand-over: [`LeaseClient::request_handover`] (`select`) and
//!   [`LeaseClient::request_follow`] (policy `follow`, which the primary may
//!   decline while busy) write `handover.json`; [`LeaseClient::wait_taken_over`]
//!   waits until the target takes writes.
//! - Heartbeats: [`Heartbeat`] under `nodes/<node_id>.json`, [`list_nodes`].
//! - What `membridge leadership info` and `membridge nodes` print.
//!
//! # Time
//!
//! `issued_at` and `expires_at` are written as whole Unix seconds, as the old
//! tool writes them (`int(time.time())`); both integer or fractional seconds and
//! RFC 3339 strings are accepted when reading. Written times are rounded up, so
//! a holder never gets less than `lease_seconds`.
//!
//! Clocks differ between machines, so the two sides of the lease read
//! `expires_at` with a margin ([`LeaseClient::skew_margin`]): the holder
//! considers its lease gone `skew_margin` *before* `expires_at`, every other
//! node considers it held until `skew_margin` *after*. As long as clocks differ
//! by less than the margin, the holder has stopped writing before anyone else
//! may take the lease. (The manifest's compare-and-swap fences a deposed primary
//! even if they do not.)
//!
//! # Epochs and sessions
//!
//! Every new tenure gets a new epoch: creating the lease is epoch 1; taking an
//! expired or released lease, `select` and a hand-over write `epoch + 1`.
//! Renewing and releasing keep the epoch. Because node ids default to host names
//! and two machines may share one, each [`LeaseClient`] also has a random
//! session id, stored in the lease as `membridge_session`: a node renews only a
//! lease that carries its own session, so two daemons with the same node id can
//! never both believe they hold the same epoch. A lease written *for* a node by
//! someone else (`select`, a hand-over) carries no session; the named node
//! adopts it at that epoch with its first renewal.
//!
//! # Audit
//!
//! Every change of holder, epoch or release writes one entry under
//! `leadership/audit/<utc>-<node>.json` with the new lease's fields (as the old
//! tool's entries have) plus `event`, `from`, `to`, `prev_epoch`, `reason`, `by`.
//! Routine renewals are not audited: one entry every TTL/3 per project would
//! bury the changes that matter under thousands of identical objects a day.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, Policy};
use crate::remote::{Layout, ObjectStore, PutMode, StoreError};

/// Default interval between two heartbeats of a node.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// A node is stale once its last heartbeat is older than this many intervals.
pub const STALE_AFTER_INTERVALS: u32 = 3;
/// How long past the TTL `select` waits for a hand-over, and for how long the
/// primary honours a `handover.json` request after it was written.
pub const HANDOVER_GRACE: Duration = Duration::from_secs(5);
/// How often the primary looks for a hand-over request (a conditional GET of
/// `handover.json`, a 304 or 404 when there is none): the first part of a
/// hand-over's latency, and two small requests a second when idle.
pub const HANDOVER_WATCH_PRIMARY: Duration = Duration::from_millis(500);
/// How often a node that may become primary looks for a request naming it, so
/// that it is watching the lease closely by the time the primary hands over
/// (a `select` run on a third machine, or on the primary's status page).
pub const HANDOVER_WATCH_SECONDARY: Duration = Duration::from_secs(1);
/// How often a node reads the lease while a hand-over to it is pending, and
/// `select` the lease and the manifest while it waits.
pub const HANDOVER_POLL: Duration = Duration::from_millis(100);

/// The lease field naming the holding daemon's session (see the module docs).
pub const SESSION_FIELD: &str = "membridge_session";
/// Set by a release: who released the lease, and when (Unix seconds).
pub const RELEASED_BY_FIELD: &str = "released_by";
pub const RELEASED_AT_FIELD: &str = "released_at";
/// Set by `migrate --rollback` on the lease it writes for the old tool: no
/// membridge node adopts it (the old tool drops it at its first renewal).
pub const ROLLBACK_FIELD: &str = "membridge_rollback";

/// How many times an operation re-reads and retries after losing a race on the
/// lease (a conditional write that failed because someone else wrote first).
const RACE_ROUNDS: usize = 3;

// ─────────────────────────────────────────────────────────────────────────────
// The lease object
// ─────────────────────────────────────────────────────────────────────────────

/// `lease.json`, with exactly the old tool's fields. Fields this version does
/// not know are kept in `extra` and written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub canonical_id: String,
    pub primary_node_id: String,
    #[serde(with = "unix_seconds")]
    pub issued_at: DateTime<Utc>,
    #[serde(with = "unix_seconds")]
    pub expires_at: DateTime<Utc>,
    pub lease_seconds: u64,
    pub epoch: u64,
    /// The writer's policy: `pinned` or `auto` from membridge,
    /// `primary_authoritative` from the old tool. Informational only.
    pub policy: String,
    pub issued_by: String,
    /// Set by the old tool when it bootstrapped a lease without
    /// `PRIMARY_NODE_ID`; kept on renewal, cleared by a new tenure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs_ui_selection: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Lease {
    /// Parses `body` read from `key` and checks that it belongs to project
    /// `canonical_id`. Nothing is repaired: the caller reports the error.
    pub fn parse(key: &str, body: &[u8], canonical_id: &str) -> Result<Lease, LeaseError> {
        let malformed = |why: String| LeaseError::Malformed {
            key: key.to_string(),
            why,
        };
        let v: Value =
            serde_json::from_slice(body).map_err(|e| malformed(format!("not valid JSON: {e}")))?;
        if !v.is_object() {
            return Err(malformed("not a JSON object".into()));
        }
        // From the bytes, not `v`: the error then says where (line, column).
        let lease: Lease = serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?;
        if lease.canonical_id != canonical_id {
            return Err(LeaseError::ForeignProject {
                key: key.to_string(),
                found: lease.canonical_id,
                expected: canonical_id.to_string(),
            });
        }
        if lease.primary_node_id.is_empty() {
            return Err(malformed("primary_node_id is empty".into()));
        }
        Ok(lease)
    }

    /// Pretty JSON, two-space indented like the old tool's `json.dumps(indent=2)`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a lease serializes");
        v.push(b'\n');
        v
    }

    /// The session of the daemon holding it; `None` for a lease written for a
    /// node by someone else (select, hand-over, the old tool).
    pub fn session(&self) -> Option<&str> {
        self.extra.get(SESSION_FIELD).and_then(Value::as_str)
    }

    /// Who released it, if it was released rather than left to expire.
    pub fn released_by(&self) -> Option<&str> {
        self.extra.get(RELEASED_BY_FIELD).and_then(Value::as_str)
    }

    pub fn is_released(&self) -> bool {
        self.extra.contains_key(RELEASED_BY_FIELD)
    }

    /// `expires_at - now`, negative once expired.
    pub fn remaining(&self, now: DateTime<Utc>) -> chrono::Duration {
        self.expires_at - now
    }

    /// "n1 at epoch 4" (plus "released" when it is), for messages.
    pub fn describe(&self) -> String {
        let released = if self.is_released() { ", released" } else { "" };
        format!("{} at epoch {}{released}", self.primary_node_id, self.epoch)
    }
}

/// A lease as read or written, with the ETag that the next conditional write
/// must name.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub lease: Lease,
    pub etag: String,
}

/// Why a lease operation did not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    /// The object is not a lease (bad JSON, a missing or mistyped field). It is
    /// left as it is: an operator must look at it.
    #[error(
        "{key}: malformed lease: {why} (membridge will not overwrite it; fix or delete it by hand)"
    )]
    Malformed { key: String, why: String },

    /// The lease names another project: the bucket or `CLAUDE_PROJECT_ID` is
    /// mixed up. Left as it is.
    #[error("{key}: the lease belongs to project {found}, not {expected} (check CLAUDE_PROJECT_ID and MINIO_BUCKET; membridge will not overwrite it)")]
    ForeignProject {
        key: String,
        found: String,
        expected: String,
    },

    /// The lease this node held was changed by someone else (taken, released,
    /// handed over, deleted): stop writing. `current` is the lease as re-read.
    #[error("lease lost: {reason}")]
    Lost {
        reason: String,
        current: Option<Box<Lease>>,
    },

    /// The policy does not allow this (e.g. select a node other than the pinned one).
    #[error("{0}")]
    NotAllowed(String),

    /// `LEADERSHIP_ENABLED=0`: this node never reads or writes the lease for itself.
    #[error("leadership is disabled (LEADERSHIP_ENABLED=0): no lease is used")]
    Disabled,

    /// A `select` asked the primary to hand over, and it did not in time.
    #[error("{primary} did not hand the lease over to {target} within {waited_s} s (is its membridge daemon running and up to date?); the request was withdrawn")]
    HandoverTimeout {
        primary: String,
        target: String,
        waited_s: u64,
    },

    /// The primary declined a follow request: it wrote within the idle window.
    #[error("{primary} declined to hand over: {reason}")]
    HandoverRefused { primary: String, reason: String },

    /// The lease names `target`, but it did not take writes in time.
    #[error("{target} holds the lease (epoch {epoch}) but has not said it takes writes after {waited_s} s (the manifest is at epoch {}); see `membridge status` on {target}", manifest_epoch.map_or("-".to_string(), |e| e.to_string()))]
    NotTakenOver {
        target: String,
        epoch: u64,
        waited_s: u64,
        manifest_epoch: Option<u64>,
    },

    #[error(transparent)]
    Store(#[from] StoreError),
}

// ─────────────────────────────────────────────────────────────────────────────
// Outcomes
// ─────────────────────────────────────────────────────────────────────────────

/// How a lease came to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum How {
    /// There was none: created at epoch 1.
    Created,
    /// It had expired or was released: taken at `epoch + 1`.
    TookOver { from: String },
    /// It named this node but another session of it (an earlier run of the
    /// daemon), or this session after it had been given up: taken at `epoch + 1`.
    Reclaimed,
    /// Someone wrote it for this node (select, hand-over): adopted at its epoch.
    Adopted,
}

/// What [`LeaseClient::try_acquire`] found or did.
#[derive(Debug, Clone, PartialEq)]
pub enum Acquire {
    /// This node holds the lease now.
    Acquired { held: Versioned, how: How },
    /// Another node (or another session of this one) holds a valid lease.
    HeldBy(Versioned),
    /// Nobody holds it, or it names this node, but the policy does not let
    /// this node take it.
    NotAllowed {
        current: Option<Versioned>,
        why: String,
    },
    /// `LEADERSHIP_ENABLED=0`: nothing was read or written.
    Disabled,
}

/// What [`LeaseClient::select`] found or did.
#[derive(Debug, Clone, PartialEq)]
pub enum Select {
    /// The lease was absent, expired or released and now names the target.
    Changed(Versioned),
    /// The target already holds a valid lease.
    Unchanged(Versioned),
    /// Another node holds a valid lease: it has to hand over (flush, publish,
    /// then [`LeaseClient::hand_over`]); see [`LeaseClient::request_handover`].
    NeedsHandover(Versioned),
}

/// What [`LeaseClient::release_own`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Release {
    Released(Versioned),
    /// It was released already; nothing written.
    AlreadyReleased(Versioned),
    /// This node is not the primary (`None`: there is no lease at all).
    NotPrimary(Option<Lease>),
}

impl Release {
    /// What `leadership release` (and the status page's "release") tells the
    /// operator: `Ok` when the lease is released, `Err` (a refusal, exit 3)
    /// when `node_id` is not the primary.
    pub fn outcome(&self, node_id: &str) -> Result<String, String> {
        match self {
            Release::Released(v) => Ok(format!(
                "released the lease (epoch {}); another node may take it now",
                v.lease.epoch
            )),
            Release::AlreadyReleased(v) => Ok(format!(
                "the lease (epoch {}) is released already",
                v.lease.epoch
            )),
            Release::NotPrimary(lease) => {
                let who = lease.as_ref().map_or("there is no lease".into(), |l| {
                    format!("the primary is {}", l.describe())
                });
                Err(format!("this node ({node_id}) is not the primary: {who}"))
            }
        }
    }
}

/// What [`LeaseClient::request_follow`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Follow {
    /// This node held the lease already.
    Already(Versioned),
    /// The lease came to this node: handed over by an idle primary, or
    /// written for it because nobody held it.
    Moved(Versioned),
    /// The primary is busy: this node stays a reader.
    Busy { primary: String, reason: String },
}

/// `leadership/handover.json`: a request that the primary hand the lease over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handover {
    pub to: String,
    pub requested_by: String,
    #[serde(with = "rfc3339")]
    pub at: DateTime<Utc>,
    /// The epoch the request was made against; a primary at another epoch
    /// ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Set by `leadership follow` (policy `follow`): hand over only if no
    /// transaction was committed (and the lease not taken) within this many
    /// seconds. The primary decides, after it has stopped taking writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_idle_s: Option<u64>,
    /// The primary's answer when it declines (a busy primary and a follow
    /// request); an answered request is never acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// The ETag it was read with (the primary answers by `If-Match` on it).
    #[serde(skip)]
    pub etag: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Handover {
    /// A request from `requested_by` that the holder of `epoch` hand over to `to`.
    pub fn new(to: &str, requested_by: &str, epoch: u64) -> Handover {
        let now = Utc::now();
        Handover {
            to: to.to_string(),
            requested_by: requested_by.to_string(),
            // As written (milliseconds), so that the answer can be matched.
            at: DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now),
            epoch: Some(epoch),
            follow_idle_s: None,
            refused: None,
            etag: None,
            extra: Map::new(),
        }
    }

    /// Whether a primary holding `epoch` should still act on it at `now`: not
    /// older than `ttl + HANDOVER_GRACE` (how long `select` waits) and made
    /// against this epoch.
    pub fn is_current(&self, epoch: u64, ttl: Duration, now: DateTime<Utc>) -> bool {
        now - self.at <= Self::max_age(ttl) && self.epoch.is_none_or(|e| e == epoch)
    }

    fn max_age(ttl: Duration) -> chrono::Duration {
        chrono::Duration::from_std(ttl + HANDOVER_GRACE).unwrap_or_default()
    }
}

/// What a conditional read of `handover.json` found.
#[derive(Debug, Clone, PartialEq)]
pub enum Watched {
    /// Still the version whose ETag was given.
    Unchanged,
    /// There is no request.
    Absent,
    /// A new version (its `etag` set).
    Request(Handover),
}

// ─────────────────────────────────────────────────────────────────────────────
// The client
// ─────────────────────────────────────────────────────────────────────────────

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
    pub fn new(cfg: &Config, store: Arc<dyn ObjectStore>) -> LeaseClient {
        LeaseClient {
            store,
            layout: Layout::for_config(cfg),
            canonical_id: cfg.canonical_id.clone(),
            node_id: cfg.node_id.clone(),
            policy: cfg.policy.clone(),
            ttl: cfg.lease_ttl,
            skew_margin: Self::default_skew_margin(cfg.lease_ttl),
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

    fn margin(&self) -> chrono::Duration {
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
    fn fresh(
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

    async fn put(&self, lease: &Lease, mode: PutMode) -> Result<String, StoreError> {
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

    async fn acquire(&self, at_start: bool) -> Result<Acquire, LeaseError> {
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

    fn lost(&self, reason: String, current: Option<Lease>) -> LeaseError {
        LeaseError::Lost {
            reason,
            current: current.map(Box::new),
        }
    }

    fn lost_to(&self, held: &Lease, current: Option<Lease>) -> LeaseError {
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
    /// [`crate::coexist::old_tool_holder`]: it can neither hand over nor be
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
                crate::coexist::old_tool_holder(self.store.as_ref(), &self.layout, &v.lease, now)
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
                    && !crate::coexist::old_tool_holder(
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
            next.policy = crate::coexist::OLD_TOOL_POLICY.to_string();
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
        if crate::coexist::old_tool_holder(
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
    async fn ask(
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
    async fn busy_by_heartbeat(&self, primary: &str, idle: Duration) -> Option<String> {
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

    async fn wait_for(
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

    async fn wait_manifest_epoch(
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
                    let m = crate::replica::manifest::Manifest::parse(
                        &key,
                        &got.body,
                        &self.canonical_id,
                    )
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

    /// Writes one audit entry for a change from `prev` to `next`. A failure is
    /// logged, not returned: the change itself has happened.
    async fn audit(&self, event: &str, prev: Option<&Lease>, next: &Lease, reason: &str) {
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

fn parse_handover(key: &str, body: &[u8], etag: String) -> Result<Handover, LeaseError> {
    let mut h: Handover = serde_json::from_slice(body).map_err(|e| LeaseError::Malformed {
        key: key.to_string(),
        why: e.to_string(),
    })?;
    h.etag = Some(etag);
    Ok(h)
}

/// Node ids as config accepts them: 1-128 chars of A-Z a-z 0-9 - _ .
fn validate_node_id(n: &str) -> Result<(), String> {
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

// ─────────────────────────────────────────────────────────────────────────────
// The keeper
// ─────────────────────────────────────────────────────────────────────────────

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

// ─────────────────────────────────────────────────────────────────────────────
// Heartbeats
// ─────────────────────────────────────────────────────────────────────────────

/// `nodes/<node_id>.json`, written by each node every few seconds (plain put).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: String,
    /// `primary`, `secondary`, `candidate`, ... as the daemon reports it.
    pub role: String,
    #[serde(default)]
    pub epoch: Option<u64>,
    pub applied_txid: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_txid: Option<u64>,
    #[serde(default)]
    pub lag_seconds: Option<f64>,
    pub version: String,
    #[serde(with = "rfc3339")]
    pub last_seen: DateTime<Utc>,
    pub mount_dir: String,
    /// The writing daemon's lease session: two sessions alternating under one
    /// node id mean two machines share the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// A primary's last committed transaction (this run of the daemon), for
    /// `leadership follow`: whether the primary is idle.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339_opt")]
    pub last_write: Option<DateTime<Utc>>,
    /// Since when a primary has been primary (this tenure).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rfc3339_opt")]
    pub primary_since: Option<DateTime<Utc>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Heartbeat {
    /// Stale once older than `STALE_AFTER_INTERVALS` heartbeat intervals.
    pub fn is_stale(&self, now: DateTime<Utc>, interval: Duration) -> bool {
        let limit = chrono::Duration::from_std(interval * STALE_AFTER_INTERVALS)
            .unwrap_or(chrono::Duration::MAX);
        now - self.last_seen > limit
    }

    /// Why this primary is not idle for `idle` at `now`, if it is not: it
    /// wrote, or became primary, within the window.
    pub fn busy_since(&self, idle: Duration, now: DateTime<Utc>) -> Option<String> {
        busy_reason(self.last_write, self.primary_since, idle, now)
    }
}

/// Why a primary that last wrote at `last_write` and is primary since
/// `since` is not idle for `idle` at `now`, if it is not. The same rule on
/// both sides of a follow request: the requester's look at the heartbeat,
/// and the primary's own decision.
pub fn busy_reason(
    last_write: Option<DateTime<Utc>>,
    since: Option<DateTime<Utc>>,
    idle: Duration,
    now: DateTime<Utc>,
) -> Option<String> {
    let window = chrono::Duration::from_std(idle).unwrap_or(chrono::Duration::MAX);
    let ago = |t: DateTime<Utc>| (now - t).num_milliseconds().max(0) as f64 / 1000.0;
    if let Some(w) = last_write.filter(|w| now - *w < window) {
        return Some(format!(
            "it wrote {:.0} s ago (idle after {} s without a write)",
            ago(w),
            idle.as_secs()
        ));
    }
    since.filter(|s| now - *s < window).map(|s| {
        format!(
            "it became primary {:.0} s ago (it keeps the lease at least {} s)",
            ago(s),
            idle.as_secs()
        )
    })
}

/// One object under `nodes/`, parsed or not.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEntry {
    pub key: String,
    /// The heartbeat, or why it could not be read.
    pub heartbeat: Result<Heartbeat, String>,
    pub stale: bool,
}

pub async fn write_heartbeat(
    store: &dyn ObjectStore,
    layout: &Layout,
    hb: &Heartbeat,
) -> Result<(), LeaseError> {
    validate_node_id(&hb.node_id).map_err(LeaseError::NotAllowed)?;
    let body = serde_json::to_vec_pretty(hb).expect("a heartbeat serializes");
    store
        .put(&layout.node(&hb.node_id), body.into(), PutMode::Overwrite)
        .await?;
    Ok(())
}

/// Every heartbeat, by node id; unreadable ones are listed with the reason and
/// count as stale.
pub async fn list_nodes(
    store: &dyn ObjectStore,
    layout: &Layout,
    interval: Duration,
    now: DateTime<Utc>,
) -> Result<Vec<NodeEntry>, LeaseError> {
    let prefix = layout.nodes_prefix();
    let mut out = Vec::new();
    for meta in store.list(&prefix).await? {
        let Some(name) = meta.key.strip_prefix(&prefix) else {
            continue;
        };
        if name.contains('/') || !name.ends_with(".json") {
            continue;
        }
        let heartbeat = match store.get(&meta.key).await {
            Ok(got) => serde_json::from_slice::<Heartbeat>(&got.body).map_err(|e| e.to_string()),
            Err(StoreError::NotFound { .. }) => continue, // removed meanwhile
            Err(e) => Err(e.to_string()),
        };
        let stale = heartbeat
            .as_ref()
            .map_or(true, |h| h.is_stale(now, interval));
        out.push(NodeEntry {
            key: meta.key,
            heartbeat,
            stale,
        });
    }
    Ok(out)
}

/// A task writing a heartbeat every `interval`; stopped when dropped.
pub struct HeartbeatTask(tokio::task::JoinHandle<()>);

impl HeartbeatTask {
    /// Writes `make()` now and then every `interval` (each write bounded by
    /// `interval`; failures are logged and retried at the next tick).
    pub fn spawn<F>(
        store: Arc<dyn ObjectStore>,
        layout: Layout,
        interval: Duration,
        make: F,
    ) -> HeartbeatTask
    where
        F: Fn() -> Heartbeat + Send + 'static,
    {
        Self::spawn_nudged(
            store,
            layout,
            interval,
            Arc::new(tokio::sync::Notify::new()),
            make,
        )
    }

    /// [`HeartbeatTask::spawn`], also writing at once whenever `now` is
    /// notified (a role change: `nodes` and `leadership follow` see it
    /// without waiting for the next interval).
    pub fn spawn_nudged<F>(
        store: Arc<dyn ObjectStore>,
        layout: Layout,
        interval: Duration,
        now: Arc<tokio::sync::Notify>,
        make: F,
    ) -> HeartbeatTask
    where
        F: Fn() -> Heartbeat + Send + 'static,
    {
        HeartbeatTask(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = now.notified() => tick.reset(),
                }
                let hb = make();
                match tokio::time::timeout(interval, write_heartbeat(&*store, &layout, &hb)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat not written"),
                    Err(_) => tracing::warn!("heartbeat not written: the bucket is slow"),
                }
            }
        }))
    }
}

impl Drop for HeartbeatTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ─────────────────────────────────────────────────────────────────────────────
// What the commands print
// ─────────────────────────────────────────────────────────────────────────────

fn fmt_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn policy_of_node(p: &Policy) -> String {
    match p {
        Policy::Pinned { primary } => format!("pinned to {primary}"),
        Policy::Auto { candidate: true } => "auto, candidate".into(),
        Policy::Auto { candidate: false } => "auto, not a candidate".into(),
        Policy::Follow { idle_s } => format!("follow, after {idle_s} s idle"),
        Policy::Disabled => "disabled".into(),
    }
}

/// `membridge leadership info`, in the old tool's `leadership_info` layout.
pub fn render_info(
    client: &LeaseClient,
    lease: Option<&Lease>,
    handover: Option<&Handover>,
    now: DateTime<Utc>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "=== Leadership Lease ===");
    let _ = writeln!(s, "  node_id:       {}", client.node_id);
    let _ = writeln!(s, "  canonical_id:  {}", client.canonical_id);
    let _ = writeln!(s);
    let role = match (&client.policy, lease) {
        (Policy::Disabled, _) => "primary (leadership disabled: no lease is used)",
        (_, Some(l)) if l.primary_node_id == client.node_id && client.seen_held(l, now) => {
            "primary"
        }
        _ => "secondary",
    };
    let _ = writeln!(s, "  role:          {role}");
    let Some(l) = lease else {
        let _ = writeln!(s, "  primary:       none (no lease yet)");
        let _ = writeln!(s, "  epoch:         0");
        let _ = writeln!(s, "  policy:        {}", policy_of_node(&client.policy));
        let _ = writeln!(s, "  ttl_remaining: -");
        if client.policy == Policy::Disabled {
            warn_disabled(&mut s);
        }
        return s;
    };
    let held = client.seen_held(l, now);
    let primary = if held {
        l.primary_node_id.clone()
    } else {
        format!("none (last: {})", l.primary_node_id)
    };
    let _ = writeln!(s, "  primary:       {primary}");
    let _ = writeln!(s, "  epoch:         {}", l.epoch);
    let _ = writeln!(
        s,
        "  policy:        {} (this node: {})",
        l.policy,
        policy_of_node(&client.policy)
    );
    let _ = writeln!(s, "  issued_by:     {}", l.issued_by);
    let _ = writeln!(s, "  issued_at:     {}", fmt_time(l.issued_at));
    let _ = writeln!(s, "  expires_at:    {}", fmt_time(l.expires_at));
    let ttl = l.remaining(now).num_seconds();
    let note = if l.is_released() {
        format!(
            " (released by {}; any eligible node may take it now)",
            l.released_by().unwrap_or("?")
        )
    } else if ttl < 0 {
        " (expired)".to_string()
    } else {
        String::new()
    };
    let _ = writeln!(s, "  ttl_remaining: {ttl}s{note}");
    if let Some(h) = handover {
        let _ = writeln!(
            s,
            "  handover:      to {} requested by {} at {}",
            h.to,
            h.requested_by,
            fmt_time(h.at)
        );
    }
    if l.needs_ui_selection == Some(true) {
        let _ = writeln!(s);
        let _ = writeln!(s, "  WARNING: needs_ui_selection=true");
        let _ = writeln!(
            s,
            "  Confirm the primary node with: membridge leadership select NODE"
        );
    }
    if client.policy == Policy::Disabled {
        warn_disabled(&mut s);
    }
    s
}

fn warn_disabled(s: &mut String) {
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  WARNING: LEADERSHIP_ENABLED=0: this node writes without a lease; make sure no other node writes"
    );
}

/// `membridge nodes`: one row per heartbeat, stale ones marked.
pub fn render_nodes(entries: &[NodeEntry], now: DateTime<Utc>) -> String {
    if entries.is_empty() {
        return "no node has written a heartbeat yet\n".into();
    }
    let header = [
        "NODE",
        "ROLE",
        "EPOCH",
        "APPLIED",
        "LAG",
        "VERSION",
        "LAST SEEN",
        "",
    ];
    let mut rows: Vec<[String; 8]> = vec![header.map(String::from)];
    for e in entries {
        let stale = if e.stale { "STALE" } else { "" }.to_string();
        match &e.heartbeat {
            Ok(h) => {
                let age = (now - h.last_seen).num_seconds().max(0);
                rows.push([
                    h.node_id.clone(),
                    h.role.clone(),
                    h.epoch.map_or("-".into(), |e| e.to_string()),
                    h.applied_txid.to_string(),
                    h.lag_seconds.map_or("-".into(), |l| format!("{l:.1}s")),
                    h.version.clone(),
                    format!("{} ({age}s ago)", fmt_time(h.last_seen)),
                    stale,
                ]);
            }
            Err(why) => {
                let name = e.key.rsplit('/').next().unwrap_or(&e.key);
                let node = name.trim_end_matches(".json").to_string();
                rows.push([
                    node,
                    format!("unreadable: {why}"),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    stale,
                ]);
            }
        }
    }
    let mut widths = [0usize; 8];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let _ = write!(line, "{c:<w$}");
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

// ─────────────────────────────────────────────────────────────────────────────
// Timestamps
// ─────────────────────────────────────────────────────────────────────────────

/// A time as the old tool (Python) or a person may have written it: Unix
/// seconds (integer or fractional, possibly as a string) or RFC 3339.
pub fn parse_time(v: &Value) -> Option<DateTime<Utc>> {
    fn from_f64(f: f64) -> Option<DateTime<Utc>> {
        if !f.is_finite() {
            return None;
        }
        let secs = f.floor();
        let nanos = ((f - secs) * 1e9).round().min(999_999_999.0) as u32;
        DateTime::from_timestamp(secs as i64, nanos)
    }
    match v {
        Value::Number(n) => match n.as_i64() {
            Some(i) => DateTime::from_timestamp(i, 0),
            None => from_f64(n.as_f64()?),
        },
        Value::String(s) => {
            let s = s.trim();
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .ok()
                .or_else(|| s.parse::<f64>().ok().and_then(from_f64))
        }
        _ => None,
    }
}

fn time_de<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let v = Value::deserialize(d)?;
    parse_time(&v).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "expected Unix seconds or an RFC 3339 time, found {v}"
        ))
    })
}

/// Written as whole Unix seconds (the old tool's format); read leniently.
mod unix_seconds {
    use chrono::{DateTime, Utc};

    pub fn serialize<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(t.timestamp())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        super::time_de(d)
    }
}

/// An optional [`rfc3339`] time.
mod rfc3339_opt {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::Deserialize;

    pub fn serialize<S: serde::Serializer>(
        t: &Option<DateTime<Utc>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        match Option::<serde_json::Value>::deserialize(d)? {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => super::parse_time(&v).map(Some).ok_or_else(|| {
                serde::de::Error::custom(format!("expected an RFC 3339 time, found {v}"))
            }),
        }
    }
}

/// Written as RFC 3339 (heartbeats, hand-over requests); read leniently.
mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};

    pub fn serialize<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        super::time_de(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "2a97516c354b6884";

    fn old_tool_lease() -> &'static str {
        r#"{
  "canonical_id": "2a97516c354b6884",
  "primary_node_id": "rpi4b",
  "issued_at": 1706000000,
  "expires_at": 1706003600,
  "lease_seconds": 3600,
  "epoch": 3,
  "policy": "primary_authoritative",
  "issued_by": "rpi4b",
  "needs_ui_selection": true,
  "from_a_newer_tool": {"x": [1, 2]}
}"#
    }

    #[test]
    fn old_tool_lease_round_trips_with_unknown_fields() {
        let l = Lease::parse("k", old_tool_lease().as_bytes(), CID).unwrap();
        assert_eq!(l.primary_node_id, "rpi4b");
        assert_eq!(l.epoch, 3);
        assert_eq!(l.issued_at.timestamp(), 1_706_000_000);
        assert_eq!(l.needs_ui_selection, Some(true));
        let back: Value = serde_json::from_slice(&l.to_json()).unwrap();
        let orig: Value = serde_json::from_str(old_tool_lease()).unwrap();
        assert_eq!(back, orig, "every field, with the same JSON types");
    }

    #[test]
    fn times_are_read_from_seconds_floats_and_rfc3339() {
        let body = |issued: &str, expires: &str| {
            format!(
                r#"{{"canonical_id":"{CID}","primary_node_id":"a","issued_at":{issued},"expires_at":{expires},"lease_seconds":30,"epoch":1,"policy":"auto","issued_by":"a"}}"#
            )
        };
        let l = Lease::parse(
            "k",
            body("1706000000.25", "\"2024-01-23T09:53:50Z\"").as_bytes(),
            CID,
        )
        .unwrap();
        assert_eq!(l.issued_at.timestamp_subsec_millis(), 250);
        assert_eq!(l.expires_at.timestamp(), 1_706_003_630);
        let l = Lease::parse("k", body("\"1706000000\"", "1706000030").as_bytes(), CID).unwrap();
        assert_eq!(l.issued_at.timestamp(), 1_706_000_000);
        let e = Lease::parse("k", body("\"soon\"", "1").as_bytes(), CID).unwrap_err();
        assert!(
            matches!(&e, LeaseError::Malformed { why, .. } if why.contains("RFC 3339")),
            "{e}"
        );
    }

    #[test]
    fn malformed_and_foreign_leases_are_typed_errors() {
        let e = Lease::parse("k", b"{not json", CID).unwrap_err();
        assert!(matches!(&e, LeaseError::Malformed { why, .. } if why.contains("not valid JSON")));
        let e = Lease::parse("k", b"[1]", CID).unwrap_err();
        assert!(
            matches!(&e, LeaseError::Malformed { why, .. } if why.contains("not a JSON object"))
        );
        let e = Lease::parse("k", br#"{"canonical_id":"2a97516c354b6884"}"#, CID).unwrap_err();
        assert!(
            matches!(&e, LeaseError::Malformed { why, .. } if why.contains("missing field")),
            "{e}"
        );
        let e = Lease::parse("k", old_tool_lease().as_bytes(), "ffffffffffffffff").unwrap_err();
        assert!(matches!(
            &e,
            LeaseError::ForeignProject { found, expected, .. }
                if found == CID && expected == "ffffffffffffffff"
        ));
        assert!(e.to_string().contains("will not overwrite"), "{e}");
    }

    #[test]
    fn stale_handover_requests_are_ignored() {
        let now = Utc::now();
        let h = Handover {
            at: now - chrono::Duration::seconds(10),
            ..Handover::new("b", "c", 4)
        };
        let ttl = Duration::from_secs(30);
        assert!(h.is_current(4, ttl, now));
        assert!(!h.is_current(5, ttl, now));
        assert!(!h.is_current(4, Duration::from_secs(3), now));
    }

    #[test]
    fn heartbeats_go_stale_after_three_intervals() {
        let now = Utc::now();
        let mut h = Heartbeat {
            node_id: "a".into(),
            role: "secondary".into(),
            epoch: Some(1),
            applied_txid: 7,
            head_txid: None,
            lag_seconds: Some(0.5),
            version: "0.1.0".into(),
            last_seen: now - chrono::Duration::seconds(14),
            mount_dir: "/m".into(),
            session: None,
            last_write: None,
            primary_since: None,
            extra: Map::new(),
        };
        assert!(!h.is_stale(now, Duration::from_secs(5)));
        h.last_seen = now - chrono::Duration::seconds(16);
        assert!(h.is_stale(now, Duration::from_secs(5)));
        let json: Value = serde_json::to_value(&h).unwrap();
        assert!(json["last_seen"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn skew_margin_scales_with_the_ttl() {
        let m = LeaseClient::default_skew_margin;
        assert_eq!(m(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(m(Duration::from_secs(30)), Duration::from_secs(3));
        assert_eq!(m(Duration::from_secs(3600)), Duration::from_secs(5));
    }
}
