use super::*;
use crate::journal::Journal;
use crate::replica::capture::Capture;

/// A node on an empty backing directory and journal.
fn node(dir: &std::path::Path, role: Role) -> Node {
    let backing = dir.join("backing");
    std::fs::create_dir_all(&backing).unwrap();
    let journal = Arc::new(Journal::open(&dir.join("journal.db")).unwrap());
    let root = crate::replica::capture::open_root(&backing);
    let status = Status::for_tests("n");
    let capture = Arc::new(Capture::new(
        root,
        journal,
        dir.join("base"),
        Arc::new(AtomicU64::new(2)),
        Arc::new(Notify::new()),
        status.clone(),
    ));
    Node::new("n", capture, role, status)
}

fn path(n: &Node) -> Vec<(String, String, Option<String>)> {
    n.lifecycle()
        .history()
        .into_iter()
        .map(|c| (c.from, c.to, c.reason))
        .collect()
}

/// The uploader's report fences only the tenure it was made in.
#[test]
fn a_fencing_report_from_another_epoch_or_role_is_stale() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), Role::Primary);
    let report = Fenced {
        epoch: 1,
        why: "the manifest moved to epoch 3".into(),
    };
    assert!(!n.fence_reported(&report, 2), "made under an earlier epoch");
    assert_eq!(n.role(), Role::Primary);
    n.set_role(Role::CatchingUp);
    let now = Fenced { epoch: 2, ..report };
    assert!(
        !n.fence_reported(&now, 2),
        "not publishing: nothing to fence"
    );
    n.set_role(Role::Primary);
    assert!(n.fence_reported(&now, 2));
    assert_eq!(n.role(), Role::Secondary);
    let h = path(&n);
    let fenced = &h[h.len() - 2];
    assert_eq!(
        (fenced.0.as_str(), fenced.1.as_str()),
        ("primary", "fenced")
    );
    assert_eq!(fenced.2.as_deref(), Some("the manifest moved to epoch 3"));
}

/// A release with nothing unpublished is not a loss; a loss fences.
#[test]
fn a_release_is_not_a_loss() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), Role::Primary);
    n.lease_gone(true, "lease lost (Released)");
    assert_eq!(
        path(&n),
        [(
            "primary".into(),
            "secondary".into(),
            Some("lease released".into())
        )]
    );
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), Role::Primary);
    n.lease_gone(false, "lease lost (Lost)");
    let to: Vec<String> = path(&n).into_iter().map(|c| c.1).collect();
    assert_eq!(to, ["fenced", "secondary"]);
}

// ─────────────────────────────────────────────────────────────────────────────
// The role rules (`drive_roles`) over an in-memory lease
// ─────────────────────────────────────────────────────────────────────────────

use crate::lease::Policy as LeasePolicy;
use crate::lease::{Acquire, LeaseClient, LeaseError, Versioned};
use crate::remote::{BoxFuture, Fault, FaultyStore, Layout, MemStore, ObjectStore, PutMode, Rule};
use crate::replica::uploader::{Policy, UploadSettings, UploadShared, Uploader};
use tokio::sync::watch;

const CID: &str = "roles";

/// A [`Leaser`] whose keeper steps the test takes: the real [`LeaseClient`]
/// over an in-memory bucket, so every change of the lease is the same
/// conditional write (and a lost race the same failure) as on S3; only the
/// keeper's timers are gone.
struct MemLease {
    client: LeaseClient,
    held: std::sync::Mutex<Option<Versioned>>,
    released: AtomicU64,
    states: watch::Sender<LeaseState>,
    handovers: watch::Sender<Option<Handover>>,
}

impl MemLease {
    fn new(store: Arc<dyn ObjectStore>, node: &str) -> Arc<MemLease> {
        let ttl = Duration::from_secs(60);
        Arc::new(MemLease {
            client: LeaseClient {
                store,
                layout: Layout::new(CID),
                canonical_id: CID.into(),
                node_id: node.into(),
                policy: LeasePolicy::Auto { candidate: true },
                ttl,
                skew_margin: LeaseClient::default_skew_margin(ttl),
                session: format!("{node}-session"),
            },
            held: std::sync::Mutex::new(None),
            released: AtomicU64::new(0),
            states: watch::channel(LeaseState::None).0,
            handovers: watch::channel(None).0,
        })
    }

    fn holding(&self, v: Versioned) {
        self.states.send_replace(LeaseState::Held {
            epoch: v.lease.epoch,
            expires: v.lease.expires_at,
            valid_until: self.client.holder_deadline(&v.lease),
        });
        *self.held.lock().unwrap() = Some(v);
    }

    fn seen(&self, v: &Versioned) {
        self.states.send_replace(LeaseState::HeldBy {
            node: v.lease.primary_node_id.clone(),
            epoch: v.lease.epoch,
            expires: v.lease.expires_at,
        });
    }

    fn lost(&self, e: &LeaseError) {
        *self.held.lock().unwrap() = None;
        self.states.send_replace(LeaseState::Lost {
            reason: e.to_string(),
        });
    }

    fn held(&self) -> Option<Versioned> {
        self.held.lock().unwrap().clone()
    }

    /// One keeper step: renew the lease held, or try to take it.
    async fn step(&self) {
        match self.held() {
            Some(h) => match self.client.renew(&h).await {
                Ok(v) => self.holding(v),
                Err(e) => self.lost(&e),
            },
            None => match self.client.try_acquire().await.unwrap() {
                Acquire::Acquired { held, .. } => self.holding(held),
                Acquire::HeldBy(v) => self.seen(&v),
                other => panic!("cannot take the lease: {other:?}"),
            },
        }
    }

    /// The keeper's look at `handover.json` while holding.
    async fn watch(&self) {
        let Some(epoch) = self.held().map(|h| h.lease.epoch) else {
            return;
        };
        if let Some(h) = self.client.read_handover().await.unwrap() {
            if self.client.should_honour(&h, epoch, chrono::Utc::now()) {
                self.handovers.send_replace(Some(h));
            }
        }
    }

    /// A release on purpose.
    async fn release(&self) {
        let h = self.held.lock().unwrap().take().unwrap();
        self.client.release(&h).await.unwrap();
        self.released.store(h.lease.epoch, Ordering::Release);
        self.states.send_replace(LeaseState::Released {
            epoch: h.lease.epoch,
        });
    }

    fn not_held(&self) -> LeaseError {
        LeaseError::NotAllowed("this node does not hold the lease".into())
    }
}

impl Leaser for MemLease {
    fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.states.subscribe()
    }

    fn handover_requests(&self) -> watch::Receiver<Option<Handover>> {
        self.handovers.subscribe()
    }

    fn released_on_purpose(&self, epoch: u64) -> bool {
        epoch != 0 && self.released.load(Ordering::Acquire) == epoch
    }

    fn raise_epoch_above(&self, epoch: u64) -> BoxFuture<'_, Result<Versioned, LeaseError>> {
        Box::pin(async move {
            let h = self.held().ok_or_else(|| self.not_held())?;
            match self.client.raise_epoch(&h, epoch + 1).await {
                Ok(v) => {
                    self.holding(v.clone());
                    Ok(v)
                }
                Err(e) => {
                    self.lost(&e);
                    Err(e)
                }
            }
        })
    }

    fn hand_over_for<'a>(
        &'a self,
        target: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<Versioned, LeaseError>> {
        Box::pin(async move {
            let h = self.held().ok_or_else(|| self.not_held())?;
            match self.client.hand_over_for(&h, target, reason).await {
                Ok(v) => {
                    *self.held.lock().unwrap() = None;
                    self.handovers.send_replace(None);
                    self.seen(&v);
                    Ok(v)
                }
                Err(e @ LeaseError::Lost { .. }) => {
                    self.lost(&e);
                    Err(e)
                }
                Err(e) => Err(e),
            }
        })
    }

    fn refuse_handover<'a>(
        &'a self,
        h: &'a Handover,
        why: &'a str,
    ) -> BoxFuture<'a, Result<bool, LeaseError>> {
        Box::pin(self.client.refuse_handover(h, why))
    }
}

/// One node driven by `drive_roles`: its lease, a real uploader (on a
/// bucket that can be cut off) and the epoch they share.
struct Rig {
    _dir: tempfile::TempDir,
    node: Arc<Node>,
    lease: Arc<MemLease>,
    epoch: Arc<AtomicU64>,
    /// The uploader's view of the bucket (the lease's is never cut off).
    upload_store: Arc<FaultyStore>,
    status: Status,
    journal: Arc<Journal>,
    base: std::path::PathBuf,
    wake: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Node `name` as a secondary on an empty journal, its roles driven.
fn rig(mem: &Arc<MemStore>, name: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    let base = dir.path().join("base");
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&base).unwrap();
    let journal = Arc::new(Journal::open(&dir.path().join("journal.db")).unwrap());
    let status = Status::for_tests(name);
    let epoch = Arc::new(AtomicU64::new(0));
    let wake = Arc::new(Notify::new());
    let capture = Arc::new(Capture::new(
        crate::replica::capture::open_root(&backing),
        journal.clone(),
        base.clone(),
        epoch.clone(),
        wake.clone(),
        status.clone(),
    ));
    let node = Arc::new(Node::new(name, capture, Role::Secondary, status.clone()));
    let mut r = Rig {
        _dir: dir,
        node,
        lease: MemLease::new(mem.clone(), name),
        epoch,
        upload_store: Arc::new(FaultyStore::new(mem.clone())),
        status,
        journal,
        base,
        wake,
        tasks: Vec::new(),
    };
    let uploader = r.uploader();
    let (cmd_tx, cmd_rx) = tokio::sync::mpsc::channel(4);
    let (fenced_tx, fenced_rx) = tokio::sync::mpsc::unbounded_channel();
    r.tasks = vec![
        tokio::spawn(uploader.run(cmd_rx, fenced_tx)),
        tokio::spawn(drive_roles(
            r.node.clone(),
            r.lease.clone(),
            r.epoch.clone(),
            cmd_tx,
            fenced_rx,
            r.status.clone(),
        )),
    ];
    r
}

impl Rig {
    /// An uploader of this node's journal (`drive_roles` has one running).
    fn uploader(&self) -> Uploader {
        Uploader::new(
            UploadSettings {
                project_id: "p".into(),
                canonical_id: CID.into(),
                node_id: self.node.lifecycle().node_id().into(),
                policy: Policy {
                    batch_window: Duration::ZERO,
                    ..Policy::default()
                },
            },
            self.upload_store.clone(),
            UploadShared {
                journal: self.journal.clone(),
                base_dir: self.base.clone(),
                epoch: self.epoch.clone(),
                wake: self.wake.clone(),
                status: self.status.clone(),
                node: self.node.clone(),
            },
        )
    }
}

/// Waits (up to 10 s) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The lease in the bucket: (holder, epoch).
async fn bucket_lease(mem: &MemStore) -> (String, u64) {
    let key = Layout::new(CID).lease();
    let got = mem.get(&key).await.unwrap();
    let l = crate::lease::Lease::parse(&key, &got.body, CID).unwrap();
    (l.primary_node_id, l.epoch)
}

/// Time passes beyond the lease: it is expired in the bucket (its holder
/// is not told, as when its renewals stop reaching the bucket).
async fn expire(mem: &MemStore) {
    let key = Layout::new(CID).lease();
    let got = mem.get(&key).await.unwrap();
    let mut l = crate::lease::Lease::parse(&key, &got.body, CID).unwrap();
    let past = chrono::Utc::now() - chrono::Duration::hours(2);
    l.issued_at = chrono::DateTime::from_timestamp(past.timestamp(), 0).unwrap();
    l.expires_at = l.issued_at + chrono::Duration::seconds(l.lease_seconds as i64);
    mem.put(&key, l.to_json().into(), PutMode::IfMatch(got.etag))
        .await
        .unwrap();
}

/// Node `a` takes the lease and becomes primary.
async fn primary(mem: &Arc<MemStore>) -> Rig {
    let a = rig(mem, "a");
    a.lease.step().await;
    until("a is primary", || a.node.role() == Role::Primary).await;
    a
}

fn tos(n: &Node) -> Vec<String> {
    path(n).into_iter().map(|c| c.1).collect()
}

/// A node holding the lease takes no writes until the uploader has taken
/// the bucket's history over; it keeps trying while it cannot.
#[tokio::test]
async fn writes_start_only_once_the_take_over_succeeds() {
    let mem = Arc::new(MemStore::new("bucket"));
    let a = rig(&mem, "a");
    let outage = a.upload_store.inject(Rule::any("*", Fault::unreachable()));
    a.lease.step().await;
    until("catching up", || a.node.role() == Role::CatchingUp).await;
    until("the reason shown", || {
        a.status.snapshot().last_error.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.node.role(), Role::CatchingUp, "the bucket is unreachable");
    drop(outage);
    a.upload_store.clear();
    until("primary", || a.node.role() == Role::Primary).await;
    assert_eq!(a.epoch.load(Ordering::Acquire), 1);
    assert_eq!(a.status.snapshot().last_error, None);
    assert_eq!(tos(&a.node), ["catching-up", "primary"]);
}

/// The manifest is at a later epoch than the lease (an old tool counted
/// on its own): the lease is taken again above it by compare-and-swap,
/// instead of retrying a take-over that cannot succeed.
#[tokio::test]
async fn an_epoch_behind_the_manifest_takes_the_lease_again_above_it() {
    let mem = Arc::new(MemStore::new("bucket"));
    // Another node's uploader took the bucket over at epoch 5.
    let x = rig(&mem, "x");
    x.epoch.store(5, Ordering::Release);
    x.uploader().take_over(5).await.unwrap();
    drop(x);

    let a = rig(&mem, "a");
    a.lease.step().await;
    until("primary", || a.node.role() == Role::Primary).await;
    assert_eq!(a.epoch.load(Ordering::Acquire), 6);
    assert_eq!(bucket_lease(&mem).await, ("a".into(), 6));
}

/// Another node took the lease (this one's had run out): the next renewal
/// fails its compare-and-swap, and the node is fenced, then follows.
#[tokio::test]
async fn a_lease_lost_to_another_node_fences() {
    let mem = Arc::new(MemStore::new("bucket"));
    let a = primary(&mem).await;
    expire(&mem).await;
    let b = MemLease::new(mem.clone(), "b");
    b.step().await;
    assert_eq!(bucket_lease(&mem).await, ("b".into(), 2));
    a.lease.step().await;
    until("secondary", || a.node.role() == Role::Secondary).await;
    assert_eq!(
        tos(&a.node),
        ["catching-up", "primary", "fenced", "secondary"]
    );
    a.lease.step().await;
    until("b named", || {
        a.node.lifecycle().holder().as_deref() == Some("b")
    })
    .await;
    assert_eq!(a.status.snapshot().epoch, Some(2));
}

/// A release on purpose with nothing unpublished is not a loss.
#[tokio::test]
async fn a_release_on_purpose_is_not_a_loss() {
    let mem = Arc::new(MemStore::new("bucket"));
    let a = primary(&mem).await;
    a.lease.release().await;
    until("secondary", || a.node.role() == Role::Secondary).await;
    let h = path(&a.node);
    assert_eq!(
        h.last().unwrap(),
        &(
            "primary".to_string(),
            "secondary".to_string(),
            Some("lease released".to_string())
        )
    );
    assert!(!tos(&a.node).contains(&"fenced".to_string()));
}

/// A hand-over request: writes stop, the backlog is published, and the
/// lease passes to the target at the next epoch.
#[tokio::test]
async fn a_hand_over_passes_the_lease_at_the_next_epoch() {
    let mem = Arc::new(MemStore::new("bucket"));
    let a = primary(&mem).await;
    let request = Handover::new("b", "b", 1);
    let key = Layout::new(CID).handover();
    let body = serde_json::to_vec(&request).unwrap();
    mem.put(&key, body.into(), PutMode::Overwrite)
        .await
        .unwrap();
    a.lease.watch().await;
    until("secondary", || a.node.role() == Role::Secondary).await;
    assert_eq!(
        tos(&a.node),
        ["catching-up", "primary", "handing-over", "secondary"]
    );
    assert_eq!(bucket_lease(&mem).await, ("b".into(), 2));
}

/// The lease changed hands after the request was seen: the hand-over's
/// compare-and-swap fails, nothing is written for the target, and the node
/// is fenced as for any loss.
#[tokio::test]
async fn a_hand_over_that_loses_its_compare_and_swap_writes_nothing() {
    let mem = Arc::new(MemStore::new("bucket"));
    let a = primary(&mem).await;
    let key = Layout::new(CID).handover();
    let body = serde_json::to_vec(&Handover::new("c", "c", 1)).unwrap();
    mem.put(&key, body.into(), PutMode::Overwrite)
        .await
        .unwrap();
    expire(&mem).await;
    MemLease::new(mem.clone(), "b").step().await;
    a.lease.watch().await;
    until("secondary", || a.node.role() == Role::Secondary).await;
    assert!(
        tos(&a.node).contains(&"fenced".to_string()),
        "{:?}",
        tos(&a.node)
    );
    assert_eq!(bucket_lease(&mem).await, ("b".into(), 2));
}
