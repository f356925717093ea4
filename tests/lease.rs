//! The leadership lease against a real S3 server (SeaweedFS): conditional
//! creation and takeover, renewal, fencing, release, select and hand-over,
//! policies, bad lease objects, heartbeats, the keeper task and the CLI.
//!
//! TTLs are 3 s and the skew margin is cut where a test waits for an expiry, so
//! the file runs in well under a minute. SeaweedFS makes the losers of a
//! contended conditional write wait 1-4 s; only the creation race pays that.

mod common;

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use tokio::sync::watch;

use membridge::lease::{
    self, Acquire, Heartbeat, How, KeeperOptions, Lease, LeaseClient, LeaseError, LeaseKeeper,
    LeaseState, Release, Select,
};
use membridge::remote::{Layout, ObjectStore, PutMode, S3Store};

use common::mount::BIN;
use common::SeaweedFs;

const PROJECT: &str = "lease-project";

fn client(bucket: &str, node: &str, extra: &[(&str, &str)]) -> LeaseClient {
    let s3 = SeaweedFs::shared();
    let mut kv = vec![
        ("MEMBRIDGE_NODE_ID", node),
        ("LEADERSHIP_LEASE_SECONDS", "3"),
    ];
    kv.extend_from_slice(extra);
    let cfg = s3.config_with(bucket, PROJECT, &kv);
    LeaseClient::new(&cfg.lease(), Arc::new(s3.store(bucket)))
}

fn fast(mut c: LeaseClient) -> LeaseClient {
    c.skew_margin = Duration::from_millis(200);
    c
}

fn store(bucket: &str) -> S3Store {
    SeaweedFs::shared().store(bucket)
}

fn layout() -> Layout {
    Layout::new(&membridge::config::canonical_id(PROJECT))
}

/// A lease as the old tool writes it, expiring `expires_in` seconds from now.
fn old_tool_lease(cid: &str, primary: &str, epoch: u64, expires_in: i64) -> String {
    let now = Utc::now().timestamp();
    format!(
        r#"{{
  "canonical_id": "{cid}",
  "primary_node_id": "{primary}",
  "issued_at": {},
  "expires_at": {},
  "lease_seconds": 3600,
  "epoch": {epoch},
  "policy": "primary_authoritative",
  "issued_by": "{primary}",
  "needs_ui_selection": true,
  "written_by_the_old_tool": "keep me"
}}"#,
        now - 3600 + expires_in,
        now + expires_in
    )
}

async fn put_raw(bucket: &str, key: &str, body: impl Into<String>) -> String {
    store(bucket)
        .put(key, body.into().into(), PutMode::Overwrite)
        .await
        .unwrap()
}

async fn raw_lease(bucket: &str) -> Value {
    let got = store(bucket).get(&layout().lease()).await.unwrap();
    serde_json::from_slice(&got.body).unwrap()
}

async fn audit_entries(bucket: &str) -> Vec<Value> {
    let s = store(bucket);
    let mut out = Vec::new();
    for m in s.list(&layout().audit_prefix()).await.unwrap() {
        let got = s.get(&m.key).await.unwrap();
        out.push(serde_json::from_slice(&got.body).unwrap());
    }
    out
}

fn acquired(a: Acquire) -> (lease::Versioned, How) {
    match a {
        Acquire::Acquired { held, how } => (held, how),
        other => panic!("expected to acquire, got {other:?}"),
    }
}

#[tokio::test]
async fn three_candidates_starting_at_once_make_exactly_one_primary_at_epoch_1() {
    let bucket = SeaweedFs::shared().new_bucket("lease-race");
    let cs: Vec<_> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| client(&bucket, n, &[]))
        .collect();
    let (a, b, c) = tokio::join!(
        cs[0].try_acquire(),
        cs[1].try_acquire(),
        cs[2].try_acquire()
    );
    let outcomes = [a.unwrap(), b.unwrap(), c.unwrap()];
    let winners: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            Acquire::Acquired { held, how } => Some((held.clone(), how.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:#?}");
    let (held, how) = &winners[0];
    assert_eq!(*how, How::Created);
    assert_eq!(held.lease.epoch, 1);
    for o in &outcomes {
        if let Acquire::HeldBy(v) = o {
            assert_eq!(v.lease.primary_node_id, held.lease.primary_node_id);
            assert_eq!(v.lease.epoch, 1);
        }
    }
    let now = cs[0].read().await.unwrap().unwrap();
    assert_eq!(now.lease, held.lease);
    let audit = audit_entries(&bucket).await;
    assert_eq!(audit.len(), 1, "{audit:#?}");
    assert_eq!(audit[0]["event"], "acquire");
    assert_eq!(audit[0]["to"], held.lease.primary_node_id.as_str());
}

#[tokio::test]
async fn renewal_keeps_the_epoch_extends_expiry_and_writes_whole_seconds() {
    let bucket = SeaweedFs::shared().new_bucket("lease-renew");
    let c = client(&bucket, "n1", &[]);
    let (held, _) = acquired(c.try_acquire().await.unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let renewed = c.renew(&held).await.unwrap();
    assert_eq!(renewed.lease.epoch, held.lease.epoch);
    assert!(renewed.lease.expires_at > held.lease.expires_at);
    assert_ne!(renewed.etag, held.etag);
    // The old tool's format: integer Unix seconds, expires = issued + lease_seconds.
    let raw = raw_lease(&bucket).await;
    let (issued, expires) = (&raw["issued_at"], &raw["expires_at"]);
    assert!(issued.is_i64() && expires.is_i64(), "{raw}");
    assert_eq!(expires.as_i64().unwrap() - issued.as_i64().unwrap(), 3);
    assert_eq!(raw["lease_seconds"], 3);
    assert_eq!(
        raw["canonical_id"],
        membridge::config::canonical_id(PROJECT)
    );
    assert_eq!(raw["policy"], "auto");
    assert_eq!(raw["issued_by"], "n1");
    assert!(c.holder_valid(&renewed.lease, Utc::now()));
    // Renewals are not audited; the creation is.
    assert_eq!(audit_entries(&bucket).await.len(), 1);
}

#[tokio::test]
async fn an_expired_lease_is_taken_at_the_next_epoch_keeping_unknown_fields() {
    let bucket = SeaweedFs::shared().new_bucket("lease-expired");
    let cid = membridge::config::canonical_id(PROJECT);
    let key = layout().lease();
    // Valid and held by another node: left alone.
    let etag = put_raw(&bucket, &key, old_tool_lease(&cid, "old-node", 4, 60)).await;
    let c = client(&bucket, "n2", &[]);
    match c.try_acquire().await.unwrap() {
        Acquire::HeldBy(v) => assert_eq!(v.etag, etag),
        other => panic!("{other:?}"),
    }
    // Expired: taken with epoch + 1.
    put_raw(&bucket, &key, old_tool_lease(&cid, "old-node", 4, -60)).await;
    let (held, how) = acquired(c.try_acquire().await.unwrap());
    assert_eq!(
        how,
        How::TookOver {
            from: "old-node".into()
        }
    );
    assert_eq!(held.lease.epoch, 5);
    assert_eq!(held.lease.primary_node_id, "n2");
    let raw = raw_lease(&bucket).await;
    assert_eq!(raw["written_by_the_old_tool"], "keep me", "{raw}");
    assert!(raw.get("needs_ui_selection").is_none(), "{raw}");
    assert_eq!(raw[lease::SESSION_FIELD], c.session.as_str());
    let audit = audit_entries(&bucket).await;
    assert_eq!(audit.len(), 1, "{audit:#?}");
    let a = &audit[0];
    assert_eq!(
        (
            &a["event"],
            &a["from"],
            &a["to"],
            &a["epoch"],
            &a["prev_epoch"],
            &a["by"]
        ),
        (
            &Value::from("takeover"),
            &Value::from("old-node"),
            &Value::from("n2"),
            &Value::from(5),
            &Value::from(4),
            &Value::from("n2")
        )
    );
}

#[tokio::test]
async fn pinned_policy_never_lets_another_node_take_the_lease() {
    let bucket = SeaweedFs::shared().new_bucket("lease-pinned");
    let pin = [("PRIMARY_NODE_ID", "p")];
    let other = client(&bucket, "n", &pin);
    let pinned = client(&bucket, "p", &pin);
    // No lease: the non-pinned node does not create one.
    assert!(matches!(
        other.try_acquire().await.unwrap(),
        Acquire::NotAllowed { current: None, .. }
    ));
    assert!(other.read().await.unwrap().is_none());
    // An expired lease: still not taken, not even touched.
    let cid = membridge::config::canonical_id(PROJECT);
    let etag = put_raw(
        &bucket,
        &layout().lease(),
        old_tool_lease(&cid, "p", 2, -60),
    )
    .await;
    match other.try_acquire().await.unwrap() {
        Acquire::NotAllowed { current, why } => {
            assert_eq!(current.unwrap().etag, etag);
            assert!(why.contains("PRIMARY_NODE_ID"), "{why}");
        }
        o => panic!("{o:?}"),
    }
    assert!(matches!(
        other.select("n").await,
        Err(LeaseError::NotAllowed(_))
    ));
    assert_eq!(other.read().await.unwrap().unwrap().etag, etag);
    // The pinned node takes it.
    let (held, _) = acquired(pinned.try_acquire().await.unwrap());
    assert_eq!(
        (held.lease.primary_node_id.as_str(), held.lease.epoch),
        ("p", 3)
    );
    assert_eq!(raw_lease(&bucket).await["policy"], "pinned");
}

#[tokio::test]
async fn disabled_policy_never_writes_anything() {
    let bucket = SeaweedFs::shared().new_bucket("lease-disabled");
    let c = client(&bucket, "n1", &[("LEADERSHIP_ENABLED", "0")]);
    assert_eq!(c.try_acquire().await.unwrap(), Acquire::Disabled);
    assert!(matches!(c.select("n1").await, Err(LeaseError::Disabled)));
    assert!(matches!(c.release_own().await, Err(LeaseError::Disabled)));
    let keeper = LeaseKeeper::spawn(c.clone(), KeeperOptions::for_ttl(c.ttl));
    let mut rx = keeper.subscribe();
    wait_state(&mut rx, "disabled", Duration::from_secs(5), |s| {
        *s == LeaseState::Disabled
    })
    .await;
    keeper.shutdown(true).await.unwrap();
    let all = store(&bucket).list(layout().prefix()).await.unwrap();
    assert!(all.is_empty(), "{all:?}");
}

#[tokio::test]
async fn a_stale_holder_cannot_renew_after_another_node_took_the_lease() {
    let bucket = SeaweedFs::shared().new_bucket("lease-fencing");
    let old = fast(client(&bucket, "n1", &[]));
    let new = fast(client(&bucket, "n2", &[]));
    let (held, _) = acquired(old.try_acquire().await.unwrap());
    // n2 gets it once it has expired (≤ 4 s, plus the margin).
    let taken = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match new.try_acquire().await.unwrap() {
                Acquire::Acquired { held, how } => return (held, how),
                Acquire::HeldBy(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                o => panic!("{o:?}"),
            }
        }
    })
    .await
    .expect("n2 never took the expired lease");
    assert_eq!(taken.1, How::TookOver { from: "n1".into() });
    assert_eq!(taken.0.lease.epoch, 2);
    // The fencing signal: n1's renewal fails and says who holds it now.
    match old.renew(&held).await {
        Err(LeaseError::Lost { reason, current }) => {
            assert!(reason.contains("n2"), "{reason}");
            assert_eq!(current.unwrap().epoch, 2);
        }
        other => panic!("expected Lost, got {other:?}"),
    }
    assert!(matches!(
        old.release(&held).await,
        Err(LeaseError::Lost { .. })
    ));
    assert_eq!(old.read().await.unwrap().unwrap().lease, taken.0.lease);
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once_at_the_next_epoch() {
    let bucket = SeaweedFs::shared().new_bucket("lease-release");
    let a = client(&bucket, "n1", &[]);
    let b = client(&bucket, "n2", &[]);
    let (held, _) = acquired(a.try_acquire().await.unwrap());
    let released = a.release(&held).await.unwrap();
    assert_eq!(released.lease.epoch, 1);
    assert_eq!(released.lease.released_by(), Some("n1"));
    assert!(released.lease.session().is_none());
    let (taken, how) = acquired(b.try_acquire().await.unwrap());
    assert_eq!(how, How::TookOver { from: "n1".into() });
    assert_eq!(taken.lease.epoch, 2);
    assert!(!taken.lease.is_released());
    assert!(matches!(a.renew(&held).await, Err(LeaseError::Lost { .. })));
    let events: Vec<_> = audit_entries(&bucket)
        .await
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert!(events.contains(&"release".to_string()), "{events:?}");
    assert_eq!(events.len(), 3, "{events:?}");
    // release_own: only the node the lease names.
    assert!(matches!(
        a.release_own().await.unwrap(),
        Release::NotPrimary(Some(l)) if l.primary_node_id == "n2"
    ));
    assert!(matches!(
        b.release_own().await.unwrap(),
        Release::Released(v) if v.lease.epoch == 2
    ));
    assert!(matches!(
        b.release_own().await.unwrap(),
        Release::AlreadyReleased(_)
    ));
}

#[tokio::test]
async fn select_takes_effect_at_once_when_the_lease_expired_and_is_audited() {
    let bucket = SeaweedFs::shared().new_bucket("lease-select");
    let cid = membridge::config::canonical_id(PROJECT);
    put_raw(
        &bucket,
        &layout().lease(),
        old_tool_lease(&cid, "gone", 7, -60),
    )
    .await;
    let ops = client(&bucket, "ops", &[]);
    let v = match ops.select("n2").await.unwrap() {
        Select::Changed(v) => v,
        o => panic!("{o:?}"),
    };
    assert_eq!((v.lease.primary_node_id.as_str(), v.lease.epoch), ("n2", 8));
    assert_eq!(v.lease.issued_by, "ops");
    assert!(v.lease.session().is_none());
    let audit = audit_entries(&bucket).await;
    let sel = audit
        .iter()
        .find(|e| e["event"] == "select")
        .expect("a select entry");
    assert_eq!(sel["from"], "gone");
    assert_eq!(sel["to"], "n2");
    assert_eq!(sel["prev_epoch"], 7);
    assert_eq!(sel["epoch"], 8);
    assert_eq!(sel["by"], "ops");
    // The selected node adopts it at that epoch.
    let n2 = client(&bucket, "n2", &[]);
    let (held, how) = acquired(n2.try_acquire().await.unwrap());
    assert_eq!((how, held.lease.epoch), (How::Adopted, 8));
    assert_eq!(held.lease.session(), Some(n2.session.as_str()));
    assert!(matches!(
        ops.select("n2").await.unwrap(),
        Select::Unchanged(_)
    ));
    // Held by a live node: select writes nothing and asks for a hand-over;
    // nobody honours it here, so the request times out and is withdrawn.
    assert!(matches!(
        ops.select("n3").await.unwrap(),
        Select::NeedsHandover(v) if v.lease.primary_node_id == "n2"
    ));
    let mut lines = Vec::new();
    let r = ops
        .request_handover("n3", Duration::from_millis(1200), &mut |l: &str| {
            lines.push(l.to_string())
        })
        .await;
    assert!(
        matches!(&r, Err(LeaseError::HandoverTimeout { primary, .. }) if primary == "n2"),
        "{r:?}"
    );
    assert!(
        lines[0].contains("warning: n3 has never written a heartbeat"),
        "{lines:?}"
    );
    assert!(lines[1].contains("asked n2"), "{lines:?}");
    assert!(ops.read_handover().await.unwrap().is_none());
    assert_eq!(
        ops.read().await.unwrap().unwrap().lease.primary_node_id,
        "n2"
    );
}

#[tokio::test]
async fn malformed_or_foreign_leases_are_reported_and_left_untouched() {
    let bucket = SeaweedFs::shared().new_bucket("lease-bad");
    let key = layout().lease();
    let c = client(&bucket, "n1", &[]);
    let s = store(&bucket);
    let cases = [
        ("{not json".to_string(), "not valid JSON"),
        (
            r#"{"canonical_id":"x","primary_node_id":"a"}"#.replace(
                "\"x\"",
                &format!("\"{}\"", membridge::config::canonical_id(PROJECT)),
            ),
            "missing field",
        ),
        (
            old_tool_lease("ffffffffffffffff", "a", 1, -60),
            "belongs to project ffffffffffffffff",
        ),
    ];
    for (body, want) in cases {
        let etag = put_raw(&bucket, &key, body.clone()).await;
        for (what, r) in [
            ("read", c.read().await.map(|_| ())),
            ("try_acquire", c.try_acquire().await.map(|_| ())),
            ("select", c.select("n1").await.map(|_| ())),
            ("release_own", c.release_own().await.map(|_| ())),
        ] {
            let e = r.expect_err(what);
            assert!(
                matches!(
                    e,
                    LeaseError::Malformed { .. } | LeaseError::ForeignProject { .. }
                ),
                "{what}: {e:?}"
            );
            assert!(e.to_string().contains(want), "{what}: {e}");
        }
        let after = s.get(&key).await.unwrap();
        assert_eq!(after.etag, etag);
        assert_eq!(after.body, body.as_bytes());
    }
    // The keeper reports it instead of taking the lease.
    let keeper = LeaseKeeper::spawn(c.clone(), KeeperOptions::for_ttl(c.ttl));
    let mut rx = keeper.subscribe();
    let st = wait_state(&mut rx, "unusable", Duration::from_secs(5), |s| {
        matches!(s, LeaseState::Unusable { .. })
    })
    .await;
    assert!(format!("{st:?}").contains("ffffffffffffffff"), "{st:?}");
    keeper.shutdown(false).await.unwrap();
}

fn heartbeat(node: &str, age_s: i64) -> Heartbeat {
    Heartbeat {
        node_id: node.into(),
        role: "secondary".into(),
        epoch: Some(3),
        applied_txid: 42,
        head_txid: Some(42),
        lag_seconds: Some(0.4),
        version: "0.1.0".into(),
        last_seen: Utc::now() - chrono::Duration::seconds(age_s),
        mount_dir: "/home/u/.claude-mem".into(),
        session: None,
        last_write: None,
        primary_since: None,
        extra: Default::default(),
    }
}

#[tokio::test]
async fn heartbeats_are_written_listed_and_marked_stale() {
    let bucket = SeaweedFs::shared().new_bucket("lease-nodes");
    let s: Arc<dyn ObjectStore> = Arc::new(store(&bucket));
    let l = layout();
    lease::write_heartbeat(&*s, &l, &heartbeat("fresh", 1))
        .await
        .unwrap();
    lease::write_heartbeat(&*s, &l, &heartbeat("old", 60))
        .await
        .unwrap();
    put_raw(&bucket, &l.node("broken"), "{").await;
    let iv = lease::DEFAULT_HEARTBEAT_INTERVAL;
    let now = Utc::now();
    let nodes = lease::list_nodes(&*s, &l, iv, now).await.unwrap();
    let by = |n: &str| {
        nodes
            .iter()
            .find(|e| e.key == l.node(n))
            .unwrap_or_else(|| panic!("{n} missing: {nodes:?}"))
    };
    assert_eq!(nodes.len(), 3);
    assert!(!by("fresh").stale);
    let hb = by("fresh").heartbeat.as_ref().unwrap();
    let want = heartbeat("fresh", 1);
    assert_eq!(
        (
            &hb.node_id,
            &hb.role,
            hb.epoch,
            hb.applied_txid,
            hb.head_txid,
            &hb.mount_dir
        ),
        (
            &want.node_id,
            &want.role,
            want.epoch,
            42,
            Some(42),
            &want.mount_dir
        )
    );
    assert!(by("old").stale);
    assert!(by("broken").stale && by("broken").heartbeat.is_err());
    let table = membridge::cli::lease::render_nodes(&nodes, now);
    let line = |n: &str| {
        table
            .lines()
            .find(|x| x.starts_with(n))
            .unwrap()
            .to_string()
    };
    assert!(table.starts_with("NODE"), "{table}");
    assert!(line("old").ends_with("STALE"), "{table}");
    assert!(!line("fresh").contains("STALE"), "{table}");
    assert!(line("broken").contains("unreadable"), "{table}");
    // The periodic writer.
    let task =
        lease::HeartbeatTask::spawn(s.clone(), l.clone(), Duration::from_millis(200), || {
            heartbeat("ticker", 0)
        });
    tokio::time::sleep(Duration::from_millis(700)).await;
    drop(task);
    let nodes = lease::list_nodes(&*s, &l, Duration::from_millis(200), Utc::now())
        .await
        .unwrap();
    let t = nodes.iter().find(|e| e.key == l.node("ticker")).unwrap();
    assert!(!t.stale, "{t:?}");
}

async fn wait_state(
    rx: &mut watch::Receiver<LeaseState>,
    what: &str,
    limit: Duration,
    f: impl FnMut(&LeaseState) -> bool,
) -> LeaseState {
    let got = match tokio::time::timeout(limit, rx.wait_for(f)).await {
        Ok(Ok(s)) => Some(s.clone()),
        _ => None,
    };
    got.unwrap_or_else(|| {
        panic!(
            "{what}: not reached within {limit:?}; state {:?}",
            *rx.borrow()
        )
    })
}

fn keeper_opts(c: &LeaseClient) -> KeeperOptions {
    KeeperOptions {
        poll_every: Duration::from_millis(300),
        ..KeeperOptions::for_ttl(c.ttl)
    }
}

#[tokio::test]
async fn keepers_fail_over_hand_over_and_release() {
    let bucket = SeaweedFs::shared().new_bucket("lease-keeper");
    let c1 = fast(client(&bucket, "n1", &[]));
    let c2 = fast(client(&bucket, "n2", &[]));
    let k1 = LeaseKeeper::spawn(c1.clone(), keeper_opts(&c1));
    let mut s1 = k1.subscribe();
    wait_state(&mut s1, "n1 primary", Duration::from_secs(10), |s| {
        s.held_epoch() == Some(1)
    })
    .await;
    let k2 = LeaseKeeper::spawn(c2.clone(), keeper_opts(&c2));
    let mut s2 = k2.subscribe();
    wait_state(
        &mut s2,
        "n2 sees n1",
        Duration::from_secs(5),
        |s| matches!(s, LeaseState::HeldBy { node, epoch: 1, .. } if node == "n1"),
    )
    .await;

    // `leadership select n2` from a third node: the primary is asked, the test
    // plays the daemon (flush, then hand over), n2 adopts.
    let ops = client(&bucket, "ops", &[]);
    let select = tokio::spawn(async move {
        let mut lines = Vec::new();
        let r = ops
            .request_handover("n2", Duration::from_secs(8), &mut |l: &str| {
                lines.push(l.to_string())
            })
            .await;
        (r, lines)
    });
    let mut requests = k1.handover_requests();
    let req = tokio::time::timeout(Duration::from_secs(5), requests.wait_for(Option::is_some))
        .await
        .expect("n1's keeper never saw the hand-over request")
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!((req.to.as_str(), req.requested_by.as_str()), ("n2", "ops"));
    let v = k1.hand_over("n2").await.unwrap();
    assert_eq!((v.lease.primary_node_id.as_str(), v.lease.epoch), ("n2", 2));
    wait_state(&mut s2, "n2 adopts", Duration::from_secs(5), |s| {
        s.held_epoch() == Some(2)
    })
    .await;
    let (r, lines) = select.await.unwrap();
    assert_eq!(r.unwrap().lease.primary_node_id, "n2");
    assert!(lines.last().unwrap().contains("handed over"), "{lines:?}");
    assert!(!k1.state().is_held());

    // A clean step-down: n1 takes the released lease without waiting for expiry.
    k2.release().await.unwrap();
    wait_state(
        &mut s1,
        "n1 takes the released lease",
        Duration::from_secs(3),
        |s| s.held_epoch() == Some(3),
    )
    .await;
    assert!(!k2.state().is_held());

    // A crash: n1's keeper stops without releasing; n2 takes over on expiry.
    drop(k1);
    let st = wait_state(&mut s2, "failover to n2", Duration::from_secs(10), |s| {
        s.held_epoch() == Some(4)
    })
    .await;
    assert!(matches!(st, LeaseState::Held { valid_until, expires, .. } if valid_until < expires));
    k2.shutdown(true).await.unwrap();
    let last = c2.read().await.unwrap().unwrap().lease;
    assert_eq!(last.released_by(), Some("n2"));
    let events: Vec<_> = audit_entries(&bucket)
        .await
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    for e in ["acquire", "handover", "release", "takeover"] {
        assert!(
            events.contains(&e.to_string()),
            "{e} missing from {events:?}"
        );
    }
}

#[tokio::test]
async fn a_keeper_reclaims_its_nodes_lease_at_start_and_reports_losing_it() {
    let bucket = SeaweedFs::shared().new_bucket("lease-reclaim");
    let cid = membridge::config::canonical_id(PROJECT);
    // A valid lease of an earlier run of n1 (another session).
    let mut l: Lease = serde_json::from_str(&old_tool_lease(&cid, "n1", 5, 60)).unwrap();
    l.extra
        .insert(lease::SESSION_FIELD.into(), Value::from("earlier-run"));
    put_raw(
        &bucket,
        &layout().lease(),
        String::from_utf8(l.to_json()).unwrap(),
    )
    .await;
    let c = client(&bucket, "n1", &[]);
    let k = LeaseKeeper::spawn(c.clone(), keeper_opts(&c));
    let mut rx = k.subscribe();
    wait_state(&mut rx, "reclaimed", Duration::from_secs(5), |s| {
        s.held_epoch() == Some(6)
    })
    .await;
    // Someone else's lease appears (e.g. an old tool rewrote it): the next
    // renewal fails and the keeper reports the new holder.
    put_raw(
        &bucket,
        &layout().lease(),
        old_tool_lease(&cid, "n9", 7, 60),
    )
    .await;
    wait_state(&mut rx, "lost to n9", Duration::from_secs(5), |s| {
        matches!(s, LeaseState::HeldBy { node, epoch: 7, .. } if node == "n9")
            || matches!(s, LeaseState::Lost { reason } if reason.contains("n9"))
    })
    .await;
    wait_state(
        &mut rx,
        "n9 holds it",
        Duration::from_secs(5),
        |s| matches!(s, LeaseState::HeldBy { node, .. } if node == "n9"),
    )
    .await;
    k.shutdown(true).await.unwrap();
}

/// A release on purpose (the keeper's own, or `leadership release` on this
/// node seen at the next renewal) is reported as `Released`, never `Lost`,
/// and `released_on_purpose` remembers it however briefly the state lasted.
#[tokio::test]
async fn a_release_on_purpose_is_not_reported_as_a_loss() {
    let bucket = SeaweedFs::shared().new_bucket("lease-released");
    let c = fast(client(&bucket, "n1", &[]));
    let k = LeaseKeeper::spawn(c.clone(), keeper_opts(&c));
    let mut rx = k.subscribe();
    let held = |s: &LeaseState| s.is_held();
    let epoch = wait_state(&mut rx, "held", Duration::from_secs(10), held)
        .await
        .held_epoch()
        .unwrap();
    assert!(!k.released_on_purpose(epoch));
    // `membridge leadership release` from another process on this node.
    assert!(matches!(
        c.release_own().await.unwrap(),
        lease::Release::Released(_)
    ));
    let st = wait_state(&mut rx, "noticed", Duration::from_secs(5), |s| !s.is_held()).await;
    assert_eq!(st, LeaseState::Released { epoch });
    assert!(k.released_on_purpose(epoch));
    // Taken again after the back-off, then released by the keeper itself.
    let epoch = wait_state(&mut rx, "held again", Duration::from_secs(10), held)
        .await
        .held_epoch()
        .unwrap();
    assert!(!k.released_on_purpose(epoch));
    k.release().await.unwrap();
    assert_eq!(k.state(), LeaseState::Released { epoch });
    assert!(k.released_on_purpose(epoch));
    k.shutdown(false).await.unwrap();
}

// ─── The command line ───────────────────────────────────────────────────────

fn run(bucket: &str, node: &str, args: &[&str]) -> Output {
    let s3 = SeaweedFs::shared();
    std::process::Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", "/nonexistent-home")
        .envs(s3.env(bucket, PROJECT))
        .env("MEMBRIDGE_NODE_ID", node)
        .env("LEADERSHIP_LEASE_SECONDS", "60")
        .output()
        .expect("run membridge")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[tokio::test]
async fn cli_info_nodes_release_and_select() {
    let bucket = SeaweedFs::shared().new_bucket("lease-cli");
    let c = client(&bucket, "n1", &[("LEADERSHIP_LEASE_SECONDS", "60")]);
    acquired(c.try_acquire().await.unwrap());

    let o = run(&bucket, "n1", &["leadership", "info"]);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    for want in [
        "  node_id:       n1",
        "  role:          primary",
        "  primary:       n1",
        "  epoch:         1",
        "  policy:        auto (this node: auto, candidate)",
        "  ttl_remaining: ",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
    let o = run(&bucket, "n2", &["leadership", "info"]);
    assert!(stdout(&o).contains("  role:          secondary"), "{o:?}");

    let s = store(&bucket);
    lease::write_heartbeat(&s, &layout(), &heartbeat("n1", 0))
        .await
        .unwrap();
    lease::write_heartbeat(&s, &layout(), &heartbeat("n2", 120))
        .await
        .unwrap();
    let o = run(&bucket, "n1", &["nodes"]);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    for col in [
        "NODE",
        "ROLE",
        "EPOCH",
        "APPLIED",
        "LAG",
        "VERSION",
        "LAST SEEN",
    ] {
        assert!(header.contains(col), "{text}");
    }
    let n1 = text.lines().find(|l| l.starts_with("n1")).unwrap();
    let n2 = text.lines().find(|l| l.starts_with("n2")).unwrap();
    assert!(n1.contains("secondary") && n1.contains("42") && !n1.contains("STALE"));
    assert!(n2.ends_with("STALE"), "{text}");

    // Release on a node that is not the primary: refused, exit 3, one line.
    let o = run(&bucket, "n2", &["leadership", "release"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("not the primary") && err.contains("n1"),
        "{err}"
    );
    // On the primary it releases.
    let o = run(&bucket, "n1", &["leadership", "release"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(c.read().await.unwrap().unwrap().lease.is_released());
    // Select from a third node: nobody holds it, so at once.
    let o = run(&bucket, "n3", &["leadership", "select", "n2"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(stdout(&o).contains("n2 is primary now (epoch 2)"), "{o:?}");
    let l = c.read().await.unwrap().unwrap().lease;
    assert_eq!((l.primary_node_id.as_str(), l.epoch), ("n2", 2));
    let o = run(&bucket, "n2", &["leadership", "info"]);
    assert!(stdout(&o).contains("  role:          primary"), "{o:?}");
}
