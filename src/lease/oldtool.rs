//! Telling an old-tool lease from membridge's (docs/ARCHITECTURE.md,
//! "Living beside the old tool"): what the lease module must know of the old
//! tool to refuse to hand over, or to take back, a lease an old-tool node
//! holds. What membridge does about such nodes is `crate::coexist`'s.

use chrono::{DateTime, Utc};

use super::{Heartbeat, Lease, DEFAULT_HEARTBEAT_INTERVAL};
use crate::remote::{Layout, ObjectStore, StoreError};

/// The `policy` the old tool writes into every lease.
pub const OLD_TOOL_POLICY: &str = "primary_authoritative";

/// How long the old tool's leases last unless `LEADERSHIP_LEASE_SECONDS` says
/// otherwise.
pub const OLD_TOOL_LEASE_SECONDS: u64 = 3600;

/// Whether `lease` was written by the old tool (its policy, no membridge
/// session, no release mark) rather than by membridge.
pub fn written_by_old_tool(lease: &Lease) -> bool {
    lease.policy == OLD_TOOL_POLICY && lease.session().is_none() && !lease.is_released()
}

/// Whether the holder of `lease` is an old-tool node: the old tool wrote the
/// lease and the holder publishes no membridge heartbeat (none, or a stale
/// one: a machine rolled back to the old tool).
pub async fn old_tool_holder(
    store: &dyn ObjectStore,
    layout: &Layout,
    lease: &Lease,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    if !written_by_old_tool(lease) {
        return Ok(false);
    }
    match store.get(&layout.node(&lease.primary_node_id)).await {
        Ok(got) => Ok(serde_json::from_slice::<Heartbeat>(&got.body)
            .map_or(true, |hb| hb.is_stale(now, DEFAULT_HEARTBEAT_INTERVAL))),
        Err(StoreError::NotFound { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}
