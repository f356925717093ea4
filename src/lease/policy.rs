//! How the lease is governed on one node, and the settings a [`LeaseClient`]
//! is made from (the daemon and the CLI build them from the configuration).

use std::time::Duration;

#[allow(unused_imports)] // for the doc links
use super::LeaseClient;

/// How the lease is governed on this node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "policy", rename_all = "lowercase")]
pub enum Policy {
    /// Only `primary` may hold the lease.
    Pinned { primary: String },
    /// Any candidate takes an expired lease.
    Auto { candidate: bool },
    /// Auto, and a Claude session started on this node asks the primary to
    /// hand over if it wrote nothing for `idle_s` seconds (README, "The
    /// lease follows the user").
    Follow { idle_s: u64 },
    /// No lease: this node writes; the operator guarantees a single writer.
    Disabled,
}

impl Policy {
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Pinned { .. } => "pinned",
            Policy::Auto { .. } => "auto",
            Policy::Follow { .. } => "follow",
            Policy::Disabled => "disabled",
        }
    }
}

/// What the lease needs to know about this node and project.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub canonical_id: String,
    pub node_id: String,
    pub policy: Policy,
    /// Written as `lease_seconds`.
    pub ttl: Duration,
}
