//! The lease object and the outcomes of operations on it (docs/ARCHITECTURE.md
//! §3 "Lease, roles and fencing"): [`Lease`] as `lease.json` holds it, parsed
//! strictly and written back with every field it had; [`LeaseError`]; what each
//! [`LeaseClient`](super::LeaseClient) operation reports ([`Acquire`],
//! [`Select`], [`Release`], [`Follow`], [`Watched`]); and the hand-over request
//! [`Handover`] (`handover.json`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::remote::StoreError;

use super::time::{rfc3339, unix_seconds};
use super::*;

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

    pub(super) fn max_age(ttl: Duration) -> chrono::Duration {
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
}
