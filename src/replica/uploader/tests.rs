use super::*;
use crate::journal::Txn;
use crate::remote::{Fault, FaultyStore, MemStore, Op, Rule};
use crate::replica::capture::Capture;

const DB: &str = "claude-mem.db";
const PS: u32 = 4096;

/// One node's uploader on a bucket, its journal holding a first generation
/// of `DB` with `txns` transactions written under epoch 1.
struct Fixture {
    _dir: tempfile::TempDir,
    journal: Arc<Journal>,
    epoch: Arc<AtomicU64>,
    up: Uploader,
}

fn fixture(store: Arc<dyn ObjectStore>, txns: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::create_dir_all(&backing).unwrap();
    let base_dir = dir.path().join("base");
    std::fs::create_dir_all(&base_dir).unwrap();
    let journal = Arc::new(Journal::open(&dir.path().join("journal.db")).unwrap());
    std::fs::write(base_path(&base_dir, DB, 0), vec![0u8; PS as usize]).unwrap();
    journal
        .start_generation(&DbHead {
            name: DB.into(),
            page_size: PS,
            generation: 1,
            head_txid: 0,
            head_checksum: 0,
            size_pages: 1,
            uploaded_txid: 0,
            base_txid: 0,
        })
        .unwrap();
    for txid in 1..=txns {
        journal
            .append(
                DB,
                &Txn {
                    txid,
                    epoch: 1,
                    db_size_pages: 1,
                    pre_checksum: txid - 1,
                    post_checksum: txid,
                    timestamp_ms: 1,
                    pages: vec![(1, Bytes::from(vec![txid as u8; PS as usize]))],
                },
            )
            .unwrap();
    }
    let epoch = Arc::new(AtomicU64::new(1));
    let status = Status::for_tests("b");
    let wake = Arc::new(Notify::new());
    let root = crate::replica::capture::open_root(&backing);
    let capture = Arc::new(Capture::new(
        root,
        journal.clone(),
        base_dir.clone(),
        epoch.clone(),
        wake.clone(),
        status.clone(),
    ));
    let node = Arc::new(Node::new(
        "b",
        capture,
        crate::replica::node::Role::Primary,
        status.clone(),
    ));
    let up = Uploader::new(
        UploadSettings {
            project_id: "p".into(),
            canonical_id: "test".into(),
            node_id: "b".into(),
            policy: Policy::default(),
        },
        store,
        UploadShared {
            journal: journal.clone(),
            base_dir,
            epoch: epoch.clone(),
            wake,
            status,
            node,
        },
    );
    Fixture {
        _dir: dir,
        journal,
        epoch,
        up,
    }
}

async fn manifest_of(store: &dyn ObjectStore) -> Manifest {
    manifest::load(store, &Layout::new("test"), "test")
        .await
        .unwrap()
        .unwrap()
        .manifest
}

/// Rewrites the manifest behind the uploader's back, once, just before its
/// next manifest CAS: `change` is what the other writer does.
fn race_next_manifest_cas(
    faulty: &FaultyStore,
    mem: Arc<MemStore>,
    change: fn(&mut Manifest),
) -> crate::remote::faults::RuleHandle {
    faulty.inject(
        Rule::new(
            Op::Put,
            "*manifest.json",
            Fault::before(move |_| {
                let mem = mem.clone();
                async move {
                    let layout = Layout::new("test");
                    let v = manifest::load(mem.as_ref(), &layout, "test")
                        .await
                        .unwrap()
                        .unwrap();
                    let mut next = v.manifest.clone();
                    change(&mut next);
                    manifest::swap(mem.as_ref(), &layout, Some(&v.etag), &next)
                        .await
                        .unwrap();
                }
            }),
        )
        .times(1),
    )
}

/// Issue 11, item 3: the old primary's last upload advances the head
/// between take_over's read and its epoch-bump CAS. The retry must decide
/// again from the manifest as it now is (this node is behind: catch up
/// first), not re-apply the first decision: that left a manifest whose
/// head was beyond the new epoch's start_txid, so followers rejected the
/// old epoch's segments and the new primary's publishes failed forever.
#[tokio::test]
async fn take_over_decides_again_after_a_lost_epoch_bump_race() {
    let mem = Arc::new(MemStore::new("bucket"));
    let faulty = Arc::new(FaultyStore::new(mem.clone()));
    let mut f = fixture(faulty.clone(), 3);
    f.up.round().await.unwrap();
    assert_eq!(manifest_of(mem.as_ref()).await.databases[DB].head_txid, 3);

    let raced = race_next_manifest_cas(&faulty, mem.clone(), |m| {
        // The deposed primary publishes txid 4 under epoch 1.
        let d = m.databases.get_mut(DB).unwrap();
        d.head_txid = 4;
        d.head_checksum = hex64(0xdead);
        m.updated_by = "a".into();
    });
    f.epoch.store(2, Ordering::Release);
    let res = f.up.take_over(2).await;
    assert_eq!(raced.fired(), 1);
    let m = manifest_of(mem.as_ref()).await;
    let err = res.expect_err("this node is behind the bucket: it must catch up first");
    assert!(err.to_string().contains("catch up"), "{err}");
    assert_eq!(m.epoch, 1, "the epoch must not move on a stale decision");
    assert!(m.epochs.iter().all(|e| e.epoch != 2), "{:?}", m.epochs);
    assert_eq!(m.databases[DB].head_txid, 4);
}

/// Issue 12: a snapshot never sits whole in memory. The object goes up
/// through a streamed put from a file (a whole-buffer put does not fire the
/// rule), for an image several times the codec's and the upload's buffers,
/// and it holds the bytes the in-memory encoder makes of the image.
#[tokio::test]
async fn a_snapshot_is_uploaded_from_a_file_not_a_buffer() {
    let mem = Arc::new(MemStore::new("bucket"));
    let faulty = Arc::new(FaultyStore::new(mem.clone()));
    let f = fixture(faulty.clone(), 0);
    // 4 MiB that zstd cannot shrink (xorshift), so the object is as large.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let image: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let base_dir = f.up.base_dir.clone();
    std::fs::write(base_path(&base_dir, DB, 0), &image).unwrap();
    let tmp = base_path(&base_dir, DB, 0).with_extension("snapshot.tmp");
    let streamed = faulty.inject(Rule::new(
        Op::PutFile,
        "*/snap/*",
        Fault::before(move |_| {
            let len = std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
            assert!(
                len > 4 << 20,
                "the body is a file of the whole object ({len} bytes)"
            );
            async {}
        }),
    ));
    let mut up = f.up;
    up.round().await.unwrap();
    assert_eq!(
        streamed.fired(),
        1,
        "the snapshot was not streamed from a file"
    );
    let key = Layout::new("test").snapshot(DB, 0);
    let got = mem.body(&key).expect("snapshot uploaded");
    let (header, decoded) = codec::decode_snapshot(&got).unwrap();
    assert_eq!(decoded, image);
    let meta = SnapshotMeta {
        db_name: DB.into(),
        node_id: header.node_id.clone(),
        txid: 0,
        epoch: header.epoch,
        page_size: PS,
        page_count: header.page_count,
        db_checksum: header.db_checksum,
        timestamp_ms: header.timestamp_ms,
    };
    assert!(
        got == codec::encode_snapshot(meta, &image).unwrap(),
        "format changed"
    );
    let left: Vec<_> = std::fs::read_dir(&base_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "the body file is removed: {left:?}");
}

/// A concurrent change that leaves the head alone: the retry succeeds,
/// and the new epoch starts right after the head it read again.
#[tokio::test]
async fn take_over_retries_a_lost_race_that_left_the_head_alone() {
    let mem = Arc::new(MemStore::new("bucket"));
    let faulty = Arc::new(FaultyStore::new(mem.clone()));
    let mut f = fixture(faulty.clone(), 3);
    f.up.round().await.unwrap();
    let raced = race_next_manifest_cas(&faulty, mem.clone(), |m| {
        m.updated_by = "someone-else".into();
    });
    f.epoch.store(2, Ordering::Release);
    f.up.take_over(2).await.unwrap();
    assert_eq!(raced.fired(), 1);
    let m = manifest_of(mem.as_ref()).await;
    assert_eq!(m.epoch, 2);
    let e2 = m.epochs.iter().find(|e| e.epoch == 2).unwrap();
    assert_eq!(e2.start_txid[DB], 4);
    assert_eq!(f.journal.last_epoch().unwrap(), 2);
}
