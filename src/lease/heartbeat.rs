//! Heartbeats (docs/ARCHITECTURE.md §3 "Lease, roles and fencing"): each node's
//! [`Heartbeat`] under `nodes/<node_id>.json`, written periodically by
//! [`HeartbeatTask`] and listed, stale ones marked, by [`list_nodes`].

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::remote::{Layout, ObjectStore, PutMode, StoreError};

use super::time::{rfc3339, rfc3339_opt};
use super::*;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
