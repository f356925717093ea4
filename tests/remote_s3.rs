//! The object-store contract against a real S3 server (SeaweedFS): plain and
//! ranged reads, paginated listing, and above all the conditional writes the
//! lease and the manifest rest on.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use membridge::remote::{ObjectStore, PutMode, RetryPolicy, S3Options, S3Store, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::SeaweedFs;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[tokio::test]
async fn put_get_head_delete_round_trip() {
    let s3 = SeaweedFs::shared();
    put_get_head_delete_round_trip_on(&s3.store(&s3.new_bucket("roundtrip"))).await;
}

async fn put_get_head_delete_round_trip_on(store: &dyn ObjectStore) {
    let key = "projects/x/nodes/n1.json";

    let etag = store
        .put(key, b("hello"), PutMode::Overwrite)
        .await
        .unwrap();
    assert!(!etag.is_empty());
    let got = store.get(key).await.unwrap();
    assert_eq!(got.body, b("hello"));
    assert_eq!(got.etag, etag);

    let meta = store.head(key).await.unwrap();
    assert_eq!((meta.key.as_str(), meta.size), (key, 5));
    assert_eq!(meta.etag, etag);
    let age = chrono::Utc::now() - meta.last_modified.expect("last_modified");
    assert!(age.num_seconds().abs() < 60, "{age}");

    // Overwrite changes the ETag.
    let etag2 = store
        .put(key, b("hello again"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_ne!(etag, etag2);

    store.delete(key).await.unwrap();
    store.delete(key).await.unwrap(); // deleting twice is fine
    assert!(matches!(
        store.get(key).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.head(key).await,
        Err(StoreError::NotFound { .. })
    ));
}

#[tokio::test]
async fn empty_objects_and_binary_bodies_survive() {
    let s3 = SeaweedFs::shared();
    empty_objects_and_binary_bodies_survive_on(&s3.store(&s3.new_bucket("bodies"))).await;
}

async fn empty_objects_and_binary_bodies_survive_on(store: &dyn ObjectStore) {
    store
        .put("empty", Bytes::new(), PutMode::CreateOnly)
        .await
        .unwrap();
    assert_eq!(store.get("empty").await.unwrap().body.len(), 0);
    assert_eq!(store.head("empty").await.unwrap().size, 0);
    let blob: Bytes = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    store
        .put("blob", blob.clone(), PutMode::CreateOnly)
        .await
        .unwrap();
    assert_eq!(store.get("blob").await.unwrap().body, blob);
}

#[tokio::test]
async fn range_reads() {
    let s3 = SeaweedFs::shared();
    range_reads_on(&s3.store(&s3.new_bucket("range"))).await;
}

async fn range_reads_on(store: &dyn ObjectStore) {
    let body: Bytes = (0..=255u8).cycle().take(10_000).collect();
    store
        .put("snap", body.clone(), PutMode::CreateOnly)
        .await
        .unwrap();

    assert_eq!(
        store.get_range("snap", 0, 1).await.unwrap(),
        body.slice(0..1)
    );
    assert_eq!(
        store.get_range("snap", 4096, 4096).await.unwrap(),
        body.slice(4096..8192)
    );
    // A range running past the end is cut at the end.
    assert_eq!(
        store.get_range("snap", 9_990, 100).await.unwrap(),
        body.slice(9_990..)
    );
    assert!(store.get_range("snap", 5, 0).await.unwrap().is_empty());
    let beyond = store.get_range("snap", 10_000, 10).await;
    assert!(
        matches!(beyond, Err(StoreError::InvalidRange { start: 10_000, .. })),
        "{beyond:?}"
    );
    let missing = store.get_range("nope", 0, 10).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
}

#[tokio::test]
async fn list_follows_every_page() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("list");
    let small_pages = S3Store::new(
        &s3.config(&bucket, "p").s3,
        S3Options {
            list_page_size: 7,
            ..common::fast_options()
        },
    );
    list_in_key_order_on(&small_pages).await;
}

async fn list_in_key_order_on(store: &dyn ObjectStore) {
    for i in 0..30 {
        let key = format!("projects/p/db/d/seg/{i:016x}-{i:016x}.seg");
        store.put(&key, b("s"), PutMode::CreateOnly).await.unwrap();
    }
    store
        .put("projects/p/manifest.json", b("{}"), PutMode::Overwrite)
        .await
        .unwrap();
    store
        .put("projects/q/db/d/seg/x", b("other"), PutMode::Overwrite)
        .await
        .unwrap();

    let listed = store.list("projects/p/db/").await.unwrap();
    assert_eq!(listed.len(), 30);
    let keys: Vec<&str> = listed.iter().map(|m| m.key.as_str()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "listing is in key order");
    assert!(listed.iter().all(|m| m.size == 1 && !m.etag.is_empty()));
    assert!(store.list("projects/none/").await.unwrap().is_empty());
}

#[tokio::test]
async fn list_beyond_one_thousand_keys() {
    let s3 = SeaweedFs::shared();
    let store = Arc::new(s3.store(&s3.new_bucket("list-1100")));
    let mut tasks = tokio::task::JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..16 {
        let (store, next) = (store.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= 1100 {
                    return;
                }
                let key = format!("many/{i:05}");
                store
                    .put(&key, Bytes::new(), PutMode::Overwrite)
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let listed = store.list("many/").await.unwrap();
    assert_eq!(listed.len(), 1100);
    assert_eq!(listed[0].key, "many/00000");
    assert_eq!(listed[1099].key, "many/01099");
}

#[tokio::test]
async fn create_only_refuses_an_existing_key() {
    let s3 = SeaweedFs::shared();
    create_only_refuses_an_existing_key_on(&s3.store(&s3.new_bucket("create-only"))).await;
}

async fn create_only_refuses_an_existing_key_on(store: &dyn ObjectStore) {
    let key = "projects/x/leadership/lease.json";
    store
        .put(key, b("first"), PutMode::CreateOnly)
        .await
        .unwrap();
    let second = store.put(key, b("second"), PutMode::CreateOnly).await;
    assert!(
        matches!(&second, Err(StoreError::PreconditionFailed { key: k }) if k == key),
        "{second:?}"
    );
    assert_eq!(store.get(key).await.unwrap().body, b("first"));
}

#[tokio::test]
async fn if_match_is_compare_and_swap() {
    let s3 = SeaweedFs::shared();
    if_match_is_compare_and_swap_on(&s3.store(&s3.new_bucket("if-match"))).await;
}

async fn if_match_is_compare_and_swap_on(store: &dyn ObjectStore) {
    let key = "projects/x/manifest.json";
    let e1 = store.put(key, b("v1"), PutMode::CreateOnly).await.unwrap();
    let e2 = store
        .put(key, b("v2"), PutMode::IfMatch(e1.clone()))
        .await
        .unwrap();
    assert_ne!(e1, e2);

    let stale = store.put(key, b("v3"), PutMode::IfMatch(e1)).await;
    assert!(
        matches!(stale, Err(StoreError::PreconditionFailed { .. })),
        "{stale:?}"
    );
    let bogus = store
        .put(key, b("v3"), PutMode::IfMatch("\"not-an-etag\"".into()))
        .await;
    assert!(
        matches!(bogus, Err(StoreError::PreconditionFailed { .. })),
        "{bogus:?}"
    );
    assert_eq!(store.get(key).await.unwrap().body, b("v2"));

    let missing = store
        .put("projects/x/absent", b("v"), PutMode::IfMatch(e2.clone()))
        .await;
    assert!(
        matches!(missing, Err(StoreError::PreconditionFailed { .. })),
        "{missing:?}"
    );
    assert!(matches!(
        store.head("projects/x/absent").await,
        Err(StoreError::NotFound { .. })
    ));

    let e3 = store.put(key, b("v3"), PutMode::IfMatch(e2)).await.unwrap();
    assert_eq!(store.get(key).await.unwrap().etag, e3);
}

#[tokio::test]
async fn get_if_none_match_is_a_cheap_poll() {
    let s3 = SeaweedFs::shared();
    get_if_none_match_is_a_cheap_poll_on(&s3.store(&s3.new_bucket("poll"))).await;
}

async fn get_if_none_match_is_a_cheap_poll_on(store: &dyn ObjectStore) {
    let key = "projects/x/manifest.json";
    let e1 = store.put(key, b("m1"), PutMode::CreateOnly).await.unwrap();
    assert_eq!(store.get_if_none_match(key, &e1).await.unwrap(), None);
    let e2 = store
        .put(key, b("m2"), PutMode::IfMatch(e1.clone()))
        .await
        .unwrap();
    let fresh = store
        .get_if_none_match(key, &e1)
        .await
        .unwrap()
        .expect("changed");
    assert_eq!((fresh.body, fresh.etag.clone()), (b("m2"), e2.clone()));
    assert_eq!(store.get_if_none_match(key, &e2).await.unwrap(), None);
    let gone = store.get_if_none_match("projects/x/none", &e2).await;
    assert!(matches!(gone, Err(StoreError::NotFound { .. })), "{gone:?}");
}

/// Eight nodes race to advance the same object from the same ETag, round after
/// round: exactly one may win each round, or two primaries could coexist.
///
/// SeaweedFS serialises conditional writes to one key behind a lock that waiters
/// poll about once a second, so a round of 8 takes up to ~4 s there: hence few rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cas_has_exactly_one_winner_per_round() {
    let s3 = SeaweedFs::shared();
    concurrent_cas_has_exactly_one_winner_per_round_on(Arc::new(s3.store(&s3.new_bucket("cas"))))
        .await;
}

async fn concurrent_cas_has_exactly_one_winner_per_round_on(store: Arc<dyn ObjectStore>) {
    const WRITERS: usize = 8;
    const ROUNDS: usize = 5;
    let key = "projects/x/leadership/lease.json";
    store
        .put(key, b("round 0"), PutMode::CreateOnly)
        .await
        .unwrap();

    for round in 1..=ROUNDS {
        let start = store.get(key).await.unwrap().etag;
        let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            let (store, barrier, start) = (store.clone(), barrier.clone(), start.clone());
            tasks.spawn(async move {
                let body = format!("round {round} writer {w}");
                barrier.wait().await;
                let r = store
                    .put(key, Bytes::from(body.clone()), PutMode::IfMatch(start))
                    .await;
                (body, r)
            });
        }
        let mut winners = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (body, r) = joined.unwrap();
            match r {
                Ok(etag) => winners.push((body, etag)),
                Err(StoreError::PreconditionFailed { .. }) => {}
                Err(e) => panic!("round {round}: unexpected error {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let now = store.get(key).await.unwrap();
        assert_eq!(now.body, Bytes::from(winners[0].0.clone()), "round {round}");
        assert_eq!(now.etag, winners[0].1, "round {round}");
    }
}

/// Writers that each loop read-then-CAS: every successful write must extend the
/// chain (no lost update), so the counter ends at exactly the number of wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cas_loses_no_update() {
    let s3 = SeaweedFs::shared();
    concurrent_cas_loses_no_update_on(Arc::new(s3.store(&s3.new_bucket("counter")))).await;
}

async fn concurrent_cas_loses_no_update_on(store: Arc<dyn ObjectStore>) {
    const WRITERS: usize = 8;
    const WINS_EACH: usize = 3;
    let key = "counter";
    store.put(key, b("0"), PutMode::CreateOnly).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let store = store.clone();
        tasks.spawn(async move {
            let mut wins = 0;
            for _ in 0..500 {
                let cur = store.get(key).await.unwrap();
                let n: u64 = std::str::from_utf8(&cur.body).unwrap().parse().unwrap();
                let next = Bytes::from((n + 1).to_string());
                match store.put(key, next, PutMode::IfMatch(cur.etag)).await {
                    Ok(_) => {
                        wins += 1;
                        if wins == WINS_EACH {
                            return;
                        }
                    }
                    Err(StoreError::PreconditionFailed { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            panic!("writer starved");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let end = store.get(key).await.unwrap().body;
    assert_eq!(end, Bytes::from((WRITERS * WINS_EACH).to_string()));
}

#[tokio::test]
async fn missing_bucket_is_typed() {
    let s3 = SeaweedFs::shared();
    let store = s3.store("no-such-bucket-here");
    let expect = |r: Result<(), StoreError>| {
        assert!(
            matches!(&r, Err(StoreError::NoSuchBucket { bucket }) if bucket == "no-such-bucket-here"),
            "{r:?}"
        )
    };
    expect(store.check_bucket("projects/").await);
    expect(store.list("projects/").await.map(|_| ()));
    expect(store.get("k").await.map(|_| ()));
    expect(
        store
            .put("k", b("x"), PutMode::CreateOnly)
            .await
            .map(|_| ()),
    );
    // HEAD carries no error body: a missing bucket looks like a missing key.
    assert!(matches!(
        store.head("k").await,
        Err(StoreError::NotFound { .. })
    ));
}

#[tokio::test]
async fn rejected_credentials_are_typed_and_never_leak() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("creds");
    for (k, v, code) in [
        (
            "MINIO_SECRET_KEY",
            "wrong-secret-value",
            "SignatureDoesNotMatch",
        ),
        (
            "MINIO_ACCESS_KEY",
            "wrong-access-value",
            "InvalidAccessKeyId",
        ),
    ] {
        let cfg = s3.config_with(&bucket, "p", &[(k, v)]);
        let store = S3Store::new(&cfg.s3, common::fast_options());
        for r in [
            store.check_bucket("projects/").await,
            store.get("k").await.map(|_| ()),
            store.put("k", b("x"), PutMode::Overwrite).await.map(|_| ()),
            store.head("k").await.map(|_| ()),
        ] {
            let e = r.unwrap_err();
            assert!(e.is_credentials_rejected(), "{e:?}");
            let text = format!("{e} {e:?} {store:?}");
            assert!(
                !text.contains(v) && !text.contains(&s3.secret_key),
                "{text}"
            );
            if let StoreError::AccessDenied { code: c, .. } = &e {
                // HEAD has no body, hence no code: only the status.
                assert!(c == code || c == "HTTP 403", "{c}");
            }
        }
    }
}

#[tokio::test]
async fn unreachable_endpoint_fails_within_the_retry_budget() {
    let s3 = SeaweedFs::shared();
    let endpoint = format!("http://127.0.0.1:{}", common::closed_port());
    let cfg = s3.config_with("b-any", "p", &[("MINIO_ENDPOINT", &endpoint)]);
    let store = S3Store::new(&cfg.s3, common::fast_options());
    let t = Instant::now();
    let e = store.get("k").await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    match &e {
        StoreError::Unreachable {
            attempts,
            endpoint: ep,
            ..
        } => {
            assert_eq!(*attempts, 3);
            assert_eq!(ep, &endpoint);
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(e.is_transient());
    assert!(e.to_string().contains("unreachable"), "{e}");
}

/// The harness's stop/restart (for outage tests) keeps data and ports, and the
/// same store works again once the server is back.
#[tokio::test]
async fn outage_then_recovery_on_the_same_store() {
    let s3 = SeaweedFs::start();
    let store = s3.store(&s3.bucket);
    let e1 = store
        .put("k", b("before"), PutMode::CreateOnly)
        .await
        .unwrap();
    s3.kill();
    let down = store.get("k").await.unwrap_err();
    assert!(down.is_transient(), "{down:?}");
    s3.restart();
    let got = store.get("k").await.unwrap();
    assert_eq!((got.body, got.etag), (b("before"), e1.clone()));
    store
        .put("k", b("after"), PutMode::IfMatch(e1))
        .await
        .unwrap();
    s3.stop();
    assert!(!s3.is_running());
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    // The kernel completes the handshake from the listen backlog; nobody reads.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let cfg = SeaweedFs::shared().config_with("b-any", "p", &[("MINIO_ENDPOINT", &endpoint)]);
    let opts = S3Options {
        retry: RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
            max_elapsed: Duration::from_secs(5),
        },
        request_timeout: Duration::from_millis(300),
        ..S3Options::default()
    };
    let store = S3Store::new(&cfg.s3, opts);
    let t = Instant::now();
    let e = store
        .put("k", b("x"), PutMode::CreateOnly)
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert!(
        matches!(e, StoreError::Unreachable { attempts: 2, .. }),
        "{e:?}"
    );
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(3),
        "{took:?}"
    );
    drop(silent);
}

/// A loopback proxy in front of the S3 server that, once armed, lets the next PUT
/// reach the server and then cuts the connection before the response comes back:
/// the write happened, but the client cannot know.
struct LossyProxy {
    endpoint: String,
    armed: Arc<AtomicBool>,
    cut: Arc<AtomicUsize>,
}

impl LossyProxy {
    async fn start(upstream: u16) -> LossyProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let armed = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicUsize::new(0));
        let (armed2, cut2) = (armed.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (armed, cut) = (armed2.clone(), cut2.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let doomed = AtomicBool::new(false);
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = cr.read(&mut buf).await {
                            if buf.starts_with(b"PUT ") && armed.swap(false, Ordering::SeqCst) {
                                doomed.store(true, Ordering::SeqCst);
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = sr.read(&mut buf).await {
                            if doomed.load(Ordering::SeqCst) {
                                cut.fetch_add(1, Ordering::SeqCst);
                                return; // drops the response and both connections
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        LossyProxy {
            endpoint,
            armed,
            cut,
        }
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn cut(&self) -> usize {
        self.cut.load(Ordering::SeqCst)
    }
}

/// When the response to a conditional put is lost, the retry fails its own
/// precondition (our first attempt already changed the object). That must be
/// reported as success, not as a lost race, or a primary would think it was
/// deposed by itself.
#[tokio::test]
async fn lost_response_to_a_conditional_put_is_not_a_lost_race() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("lossy");
    let proxy = LossyProxy::start(s3.s3_port()).await;
    let cfg = s3.config_with(&bucket, "p", &[("MINIO_ENDPOINT", &proxy.endpoint)]);
    let store = S3Store::new(&cfg.s3, common::fast_options());

    let e1 = store
        .put("lease", b("v1"), PutMode::CreateOnly)
        .await
        .unwrap();
    proxy.arm();
    let e2 = store
        .put("lease", b("v2"), PutMode::IfMatch(e1.clone()))
        .await
        .unwrap();
    assert_eq!(proxy.cut(), 1, "the proxy cut no response");
    let now = store.get("lease").await.unwrap();
    assert_eq!((now.body, now.etag), (b("v2"), e2.clone()));

    proxy.arm();
    store
        .put("seg", b("s1"), PutMode::CreateOnly)
        .await
        .unwrap();
    assert_eq!(proxy.cut(), 2);

    // Without an ambiguous attempt, a failed precondition is still a failure.
    let stale = store.put("lease", b("v3"), PutMode::IfMatch(e1)).await;
    assert!(
        matches!(stale, Err(StoreError::PreconditionFailed { .. })),
        "{stale:?}"
    );
    // And after an ambiguous attempt, someone else's bytes are a lost race.
    let other = s3.store(&bucket);
    other
        .put("seg2", b("theirs"), PutMode::CreateOnly)
        .await
        .unwrap();
    proxy.arm();
    // This PUT is the one cut; its retry finds "theirs" and must not claim it.
    let mine = store.put("seg2", b("mine"), PutMode::CreateOnly).await;
    assert!(
        matches!(mine, Err(StoreError::PreconditionFailed { .. })),
        "{mine:?}"
    );
    assert_eq!(other.get("seg2").await.unwrap().body, b("theirs"));

    // The same with a body streamed from a file: the retry compares the
    // object with the file, chunk by chunk.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("body");
    std::fs::write(&f, patterned(700_000)).unwrap();
    proxy.arm();
    let etag = store
        .put_file("snap", &f, PutMode::CreateOnly)
        .await
        .unwrap();
    assert_eq!(proxy.cut(), 4);
    assert_eq!(other.head("snap").await.unwrap().etag, etag);
    other
        .put(
            "snap2",
            Bytes::from(patterned(699_999)),
            PutMode::CreateOnly,
        )
        .await
        .unwrap();
    proxy.arm();
    let mine = store.put_file("snap2", &f, PutMode::CreateOnly).await;
    assert!(
        matches!(mine, Err(StoreError::PreconditionFailed { .. })),
        "{mine:?}"
    );
}

/// `len` bytes that do not repeat within a chunk.
fn patterned(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Streamed puts and gets (snapshots, the old tool's copy) keep the
/// conditions of in-memory ones, for a body several times the buffers.
#[tokio::test]
async fn streamed_put_and_get_keep_the_conditions() {
    let s3 = SeaweedFs::shared();
    streamed_put_and_get_keep_the_conditions_on(&s3.store(&s3.new_bucket("streamed"))).await;
}

async fn streamed_put_and_get_keep_the_conditions_on(store: &dyn ObjectStore) {
    let dir = tempfile::tempdir().unwrap();
    let (one, two, back) = (
        dir.path().join("one"),
        dir.path().join("two"),
        dir.path().join("back"),
    );
    std::fs::write(&one, patterned(3 << 20)).unwrap();
    std::fs::write(&two, patterned((3 << 20) + 1)).unwrap();
    let key = "projects/x/db/claude-mem.db/snap/0000000000000001.snap";
    let e1 = store
        .put_file(key, &one, PutMode::CreateOnly)
        .await
        .unwrap();
    let again = store.put_file(key, &two, PutMode::CreateOnly).await;
    assert!(
        matches!(&again, Err(StoreError::PreconditionFailed { .. })),
        "{again:?}"
    );
    let meta = store.get_to_file(key, &back).await.unwrap();
    assert_eq!((meta.size, &meta.etag), (3 << 20, &e1));
    assert!(std::fs::read(&back).unwrap() == patterned(3 << 20));
    let e2 = store
        .put_file(key, &two, PutMode::IfMatch(e1.clone()))
        .await
        .unwrap();
    let stale = store.put_file(key, &one, PutMode::IfMatch(e1)).await;
    assert!(
        matches!(&stale, Err(StoreError::PreconditionFailed { .. })),
        "{stale:?}"
    );
    assert_eq!(store.head(key).await.unwrap().etag, e2);
    assert_eq!(
        store.get_to_file(key, &back).await.unwrap().size,
        (3 << 20) + 1
    );
    assert!(std::fs::read(&back).unwrap() == patterned((3 << 20) + 1));
    let missing = store.get_to_file("projects/x/none", &back).await;
    assert!(
        matches!(&missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );
}

/// The same contract, on the in-memory store the model-based tests use: it
/// must be exactly as strict as the real server.
mod memory {
    use std::sync::Arc;

    use membridge::remote::MemStore;

    fn store() -> MemStore {
        MemStore::new("contract")
    }

    #[tokio::test]
    async fn put_get_head_delete_round_trip() {
        super::put_get_head_delete_round_trip_on(&store()).await;
    }

    #[tokio::test]
    async fn empty_objects_and_binary_bodies_survive() {
        super::empty_objects_and_binary_bodies_survive_on(&store()).await;
    }

    #[tokio::test]
    async fn range_reads() {
        super::range_reads_on(&store()).await;
    }

    #[tokio::test]
    async fn list_in_key_order() {
        super::list_in_key_order_on(&store()).await;
    }

    #[tokio::test]
    async fn create_only_refuses_an_existing_key() {
        super::create_only_refuses_an_existing_key_on(&store()).await;
    }

    #[tokio::test]
    async fn if_match_is_compare_and_swap() {
        super::if_match_is_compare_and_swap_on(&store()).await;
    }

    #[tokio::test]
    async fn get_if_none_match_is_a_cheap_poll() {
        super::get_if_none_match_is_a_cheap_poll_on(&store()).await;
    }

    #[tokio::test]
    async fn streamed_put_and_get_keep_the_conditions() {
        super::streamed_put_and_get_keep_the_conditions_on(&store()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_cas_has_exactly_one_winner_per_round() {
        super::concurrent_cas_has_exactly_one_winner_per_round_on(Arc::new(store())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_cas_loses_no_update() {
        super::concurrent_cas_loses_no_update_on(Arc::new(store())).await;
    }
}
