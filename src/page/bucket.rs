//! What the page reads from the bucket, by a task of its own while the page
//! is watched: the nodes' heartbeats and the lease's audit entries.

use super::*;

/// Reads heartbeats and audit entries every [`BUCKET_EVERY`] while the page
/// is watched; sleeps until woken otherwise.
pub(super) async fn bucket_task(shared: Arc<Shared>, lease: LeaseClient) {
    loop {
        let idle_ms = Utc::now().timestamp_millis() - shared.watched.load(Ordering::Acquire);
        if idle_ms > WATCHED_FOR.as_millis() as i64 {
            shared.wake.notified().await;
            continue;
        }
        let cache = shared.view.lock().unwrap().audit.clone();
        match tokio::time::timeout(BUCKET_TIMEOUT, read_bucket(&lease, cache)).await {
            Ok(view) => *shared.view.lock().unwrap() = view,
            Err(_) => {
                let mut v = shared.view.lock().unwrap();
                let why = format!(
                    "the bucket did not answer within {} s",
                    BUCKET_TIMEOUT.as_secs()
                );
                v.nodes_error = Some(why.clone());
                v.changes_error = Some(why);
            }
        }
        tokio::time::sleep(BUCKET_EVERY).await;
    }
}

pub(super) async fn read_bucket(
    lease: &LeaseClient,
    mut audit: BTreeMap<String, RoleChange>,
) -> BucketView {
    let now = Utc::now();
    let store = &*lease.store;
    let (nodes, nodes_error) =
        match crate::lease::list_nodes(store, &lease.layout, DEFAULT_HEARTBEAT_INTERVAL, now).await
        {
            Ok(entries) => (node_rows(&entries), None),
            Err(e) => (Vec::new(), Some(format!("cannot read the heartbeats: {e}"))),
        };
    let prefix = lease.layout.audit_prefix();
    let (changes, changes_error) = match store.list(&prefix).await {
        Err(e) => (
            Vec::new(),
            Some(format!("cannot list the audit entries: {e}")),
        ),
        Ok(list) => {
            let mut keys: Vec<String> = list.into_iter().map(|m| m.key).collect();
            keys.sort();
            let recent: Vec<String> = keys.iter().rev().take(ROLE_CHANGES + 2).cloned().collect();
            audit.retain(|k, _| recent.contains(k));
            let mut error = None;
            for key in &recent {
                if audit.contains_key(key) {
                    continue;
                }
                match store.get(key).await {
                    Ok(got) => {
                        let v: Value = serde_json::from_slice(&got.body).unwrap_or(Value::Null);
                        audit.insert(key.clone(), role_change(key, &v));
                    }
                    Err(e) => error = Some(format!("cannot read {key}: {e}")),
                }
            }
            let mut changes: Vec<RoleChange> = audit.values().cloned().collect();
            changes.sort_by(|a, b| (&b.at, &b.key).cmp(&(&a.at, &a.key)));
            changes.truncate(ROLE_CHANGES);
            (changes, error)
        }
    };
    BucketView {
        read_at: Some(now),
        nodes,
        nodes_error,
        changes,
        changes_error,
        audit,
    }
}

pub(super) fn node_rows(entries: &[crate::lease::NodeEntry]) -> Vec<NodeRow> {
    let newest_head = entries
        .iter()
        .filter_map(|e| e.heartbeat.as_ref().ok())
        .filter_map(|h| h.head_txid.or(Some(h.applied_txid)))
        .max();
    entries
        .iter()
        .map(|e| match &e.heartbeat {
            Ok(h) => NodeRow {
                id: h.node_id.clone(),
                role: Some(h.role.clone()),
                epoch: h.epoch,
                last_seen: Some(h.last_seen.to_rfc3339()),
                seconds_ago: None,
                applied_txid: Some(h.applied_txid),
                behind: newest_head.map(|n| n.saturating_sub(h.applied_txid)),
                lag_seconds: h.lag_seconds,
                version: Some(h.version.clone()),
                mount_dir: Some(h.mount_dir.clone()),
                stale: e.stale,
                error: None,
                this_node: false,
            },
            Err(why) => NodeRow {
                id: e
                    .key
                    .rsplit('/')
                    .next()
                    .unwrap_or(&e.key)
                    .trim_end_matches(".json")
                    .to_string(),
                role: None,
                epoch: None,
                last_seen: None,
                seconds_ago: None,
                applied_txid: None,
                behind: None,
                lag_seconds: None,
                version: None,
                mount_dir: None,
                stale: true,
                error: Some(why.clone()),
                this_node: false,
            },
        })
        .collect()
}

/// An audit entry, membridge's or the old tool's (which lacks `event`...).
pub(super) fn role_change(key: &str, v: &Value) -> RoleChange {
    let s = |k: &str| v[k].as_str().map(String::from);
    RoleChange {
        at: s("timestamp").or_else(|| s("issued_at")),
        event: s("event"),
        from: s("from"),
        to: s("to").or_else(|| s("primary_node_id")),
        epoch: v["epoch"].as_u64(),
        reason: s("reason"),
        by: s("by").or_else(|| s("issued_by")),
        key: key.to_string(),
    }
}
