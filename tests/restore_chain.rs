//! `restore` and `publish_legacy` against a real S3 server (SeaweedFS), with
//! fixtures made from a real SQLite database: a WAL-mode database runs a
//! workload (inserts, updates, deletes, a schema change, a rolled-back
//! transaction that spilled into the WAL, a VACUUM), its `-wal` is turned into
//! transactions by `WalTracker`, and those are shipped as the uploader would:
//! a snapshot at txid 0, segments in batches, a manifest.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};

use membridge::journal::codec::{self, SegmentMeta, SnapshotMeta, Txn};
use membridge::remote::{Layout, ObjectStore, PutMode, S3Store};
use membridge::replica::legacy::publish_legacy;
use membridge::replica::manifest::{hex64, DbManifest, EpochStart, Manifest, SnapshotRef};
use membridge::replica::restore::{
    restore, restore_with, RestoreError, RestoreOptions, RestoreReport, Target,
};
use membridge::sqlite::checksum::PageHashes;
use membridge::sqlite::wal::WalTracker;

use common::mount::BIN;
use common::SeaweedFs;

const DB: &str = "claude-mem.db";
/// 2026-01-01T00:00:00Z: transaction k commits at T0 + k minutes.
const T0_MS: i64 = 1_767_225_600_000;
const BATCH: usize = 4;

fn commit_ms(txid: u64) -> i64 {
    T0_MS + txid as i64 * 60_000
}

// ---------------------------------------------------------------------------
// The fixture: a real SQLite history

struct Fixture {
    page_size: u32,
    /// `images[k]`: the database file right after txid k (`images[0]`: before
    /// the workload).
    images: Vec<Vec<u8>>,
    /// `txns[k - 1]` is txid k, epoch 1.
    txns: Vec<Txn>,
    /// Logical dumps taken from the live database after each workload step,
    /// by the txid it had reached.
    dumps: BTreeMap<u64, String>,
}

impl Fixture {
    fn head(&self) -> u64 {
        self.txns.len() as u64
    }

    fn checksum(&self, txid: u64) -> u64 {
        PageHashes::from_bytes(&self.images[txid as usize], self.page_size)
            .unwrap()
            .checksum()
    }

    fn pages(&self, txid: u64) -> u32 {
        (self.images[txid as usize].len() / self.page_size as usize) as u32
    }

    fn txns(&self, from: u64, to: u64) -> Vec<Txn> {
        self.txns[from as usize - 1..to as usize].to_vec()
    }
}

fn fixture() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(build_fixture)
}

/// Every table's rows in rowid order, and the schema: equal dumps mean equal
/// logical content.
fn dump(c: &Connection) -> String {
    let mut out = String::new();
    let schema: Vec<(String, String, Option<String>)> = c
        .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (ty, name, sql) in &schema {
        out.push_str(&format!("{ty} {name}: {sql:?}\n"));
        if ty == "table" {
            let mut st = c
                .prepare(&format!("SELECT * FROM \"{name}\" ORDER BY rowid"))
                .unwrap();
            let n = st.column_count();
            let mut rows = st.query([]).unwrap();
            while let Some(r) = rows.next().unwrap() {
                let vals: Vec<rusqlite::types::Value> = (0..n).map(|i| r.get(i).unwrap()).collect();
                out.push_str(&format!("  {vals:?}\n"));
            }
        }
    }
    out
}

/// Opens a restored file without writing anything next to it.
fn open_image(path: &Path) -> Connection {
    Connection::open_with_flags(
        format!("file:{}?immutable=1", path.display()),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )
    .unwrap()
}

fn integrity(c: &Connection) -> String {
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

fn committed_txns(wal: &Path) -> Vec<membridge::sqlite::wal::WalTxn> {
    match std::fs::File::open(wal) {
        Ok(f) => WalTracker::new().scan(&f).unwrap(),
        Err(_) => Vec::new(),
    }
}

/// One step of the workload, run on the live connection.
type Step = Box<dyn Fn(&Connection)>;

fn build_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.db");
    let wal = dir.path().join("live.db-wal");
    let c = Connection::open(&path).unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    c.execute_batch(
        "PRAGMA wal_autocheckpoint=0;
         PRAGMA synchronous=NORMAL;
         CREATE TABLE observations(id INTEGER PRIMARY KEY AUTOINCREMENT, session TEXT, body TEXT, created_at INTEGER);
         CREATE INDEX obs_session ON observations(session);",
    )
    .unwrap();
    for i in 0..40 {
        c.execute(
            "INSERT INTO observations(session, body, created_at) VALUES (?1, ?2, ?3)",
            (format!("s{}", i % 4), format!("initial observation {i}"), i),
        )
        .unwrap();
    }
    // The state before the workload is fully in the main file.
    let (busy, _, _): (i64, i64, i64) = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(busy, 0);
    let base = std::fs::read(&path).unwrap();
    let page_size: u32 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
    assert_eq!(base.len() % page_size as usize, 0);

    let mut dumps = BTreeMap::new();
    dumps.insert(0, dump(&c));
    let blob =
        |n: usize, seed: u8| -> Vec<u8> { (0..n).map(|i| (i as u8).wrapping_mul(seed)).collect() };
    let steps: Vec<Step> = vec![
        // Single-row transactions.
        Box::new(|c| {
            c.execute(
                "INSERT INTO observations(session, body, created_at) VALUES ('s9', 'one', 100)",
                [],
            )
            .unwrap();
        }),
        Box::new(|c| {
            c.execute(
                "INSERT INTO observations(session, body, created_at) VALUES ('s9', 'two', 101)",
                [],
            )
            .unwrap();
        }),
        Box::new(|c| {
            c.execute(
                "UPDATE observations SET body = body || ' (edited)' WHERE id % 3 = 0",
                [],
            )
            .unwrap();
        }),
        Box::new(|c| {
            c.execute("DELETE FROM observations WHERE id % 5 = 0", [])
                .unwrap();
        }),
        // A schema change.
        Box::new(|c| {
            c.execute_batch(
                "BEGIN;
                 CREATE TABLE session_summaries(id INTEGER PRIMARY KEY, session TEXT, summary TEXT);
                 ALTER TABLE observations ADD COLUMN tag TEXT;
                 COMMIT;",
            )
            .unwrap();
        }),
        Box::new(|c| {
            c.execute(
                "INSERT INTO session_summaries(session, summary) VALUES ('s1', 'first session')",
                [],
            )
            .unwrap();
        }),
        // Overflow pages: the database grows.
        Box::new(move |c| {
            let tx = c.unchecked_transaction().unwrap();
            for i in 0..30 {
                tx.execute(
                    "INSERT INTO observations(session, body, created_at, tag) VALUES ('big', ?1, ?2, 'blob')",
                    (String::from_utf8_lossy(&blob(6000, i as u8 + 3)).into_owned(), 200 + i),
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }),
        Box::new(|c| {
            c.execute(
                "UPDATE observations SET tag = 'tagged' WHERE session = 's1'",
                [],
            )
            .unwrap();
        }),
        // A rolled-back transaction big enough to spill pages into the WAL.
        Box::new(move |c| {
            c.execute_batch("PRAGMA cache_size=4").unwrap();
            let tx = c.unchecked_transaction().unwrap();
            for i in 0..60 {
                tx.execute(
                    "INSERT INTO observations(session, body, created_at) VALUES ('doomed', ?1, ?2)",
                    (
                        String::from_utf8_lossy(&blob(5000, i as u8 + 7)).into_owned(),
                        300 + i,
                    ),
                )
                .unwrap();
            }
            tx.rollback().unwrap();
            c.execute_batch("PRAGMA cache_size=-2000").unwrap();
        }),
        Box::new(|c| {
            c.execute("INSERT INTO session_summaries(session, summary) VALUES ('s2', 'after the rollback')", [])
                .unwrap();
        }),
        Box::new(|c| {
            c.execute(
                "INSERT INTO observations(session, body, created_at) VALUES ('s2', 'short', 400)",
                [],
            )
            .unwrap();
        }),
        // Free most of the database, then VACUUM: it shrinks.
        Box::new(|c| {
            c.execute(
                "DELETE FROM observations WHERE session = 'big' AND created_at % 4 != 0",
                [],
            )
            .unwrap();
        }),
        Box::new(|c| {
            c.execute_batch("VACUUM").unwrap();
        }),
        Box::new(|c| {
            c.execute("UPDATE session_summaries SET summary = summary || '!'", [])
                .unwrap();
        }),
        Box::new(|c| {
            c.execute_batch(
                "BEGIN;
                 CREATE TABLE user_prompts(id INTEGER PRIMARY KEY, prompt TEXT);
                 INSERT INTO user_prompts(prompt) VALUES ('hello'), ('again');
                 COMMIT;",
            )
            .unwrap();
        }),
        Box::new(|c| {
            c.execute("DELETE FROM observations WHERE session = 's9'", [])
                .unwrap();
        }),
    ];
    let mut singles = 0;
    let wal_len = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let mut spilled = false;
    for (i, step) in steps.iter().enumerate() {
        let (len0, n0) = (wal_len(), committed_txns(&wal).len());
        step(&c);
        if (wal_len(), committed_txns(&wal).len()) != (len0, n0) && committed_txns(&wal).len() == n0
        {
            // Frames were written, none committed: the rolled-back step.
            spilled = true;
        }
        // Also some plain one-insert transactions between the steps.
        if i % 2 == 0 {
            singles += 1;
            c.execute(
                "INSERT INTO observations(session, body, created_at) VALUES ('tick', ?1, ?2)",
                (format!("tick {singles}"), 1000 + singles),
            )
            .unwrap();
        }
        let n = committed_txns(&wal).len() as u64;
        dumps.insert(n, dump(&c));
    }

    assert!(
        spilled,
        "the rolled-back transaction left uncommitted frames in the WAL"
    );

    // Transactions, checksums and the image after each txid.
    let wal_txns = committed_txns(&wal);
    let mut hashes = PageHashes::from_bytes(&base, page_size).unwrap();
    let mut images = vec![base];
    let mut txns = Vec::new();
    for (i, w) in wal_txns.into_iter().enumerate() {
        let txid = i as u64 + 1;
        let pages: Vec<(u32, Bytes)> = w.pages.into_iter().collect();
        let pre = hashes.checksum();
        let post = hashes
            .apply(pages.iter().map(|(p, d)| (*p, &d[..])), w.db_size_pages)
            .unwrap();
        let mut img = images.last().unwrap().clone();
        img.resize(w.db_size_pages as usize * page_size as usize, 0);
        for (p, d) in &pages {
            let o = (*p as usize - 1) * page_size as usize;
            img[o..o + page_size as usize].copy_from_slice(d);
        }
        images.push(img);
        txns.push(Txn {
            txid,
            epoch: 1,
            db_size_pages: w.db_size_pages,
            pre_checksum: pre,
            post_checksum: post,
            timestamp_ms: commit_ms(txid),
            pages,
        });
    }
    let n = txns.len();
    assert!(n >= 20, "workload made only {n} transactions");
    assert_eq!(dumps.keys().last().copied(), Some(n as u64));
    // The history shrinks (VACUUM) and grows.
    let sizes: Vec<u32> = txns.iter().map(|t| t.db_size_pages).collect();
    assert!(sizes.windows(2).any(|w| w[1] < w[0]), "{sizes:?}");
    assert!(sizes.windows(2).any(|w| w[1] > w[0]), "{sizes:?}");

    // The fixture itself agrees with SQLite: the checkpointed live file is
    // the last image, byte for byte.
    let live_dump = dump(&c);
    let _: (i64, i64, i64) = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), *images.last().unwrap());
    assert_eq!(dumps[&(n as u64)], live_dump);
    drop(c);
    Fixture {
        page_size,
        images,
        txns,
        dumps,
    }
}

// ---------------------------------------------------------------------------
// Publishing the fixture as the uploader would

struct Remote {
    store: S3Store,
    layout: Layout,
    cid: String,
}

impl Remote {
    fn new(tag: &str) -> Remote {
        let s3 = SeaweedFs::shared();
        let bucket = s3.new_bucket(tag);
        Remote::on(s3.store(&bucket), tag)
    }

    fn on(store: S3Store, project: &str) -> Remote {
        let cid = membridge::config::canonical_id(project);
        Remote {
            store,
            layout: Layout::new(&cid),
            cid,
        }
    }

    async fn put(&self, key: &str, body: Vec<u8>) {
        self.store
            .put(key, Bytes::from(body), PutMode::Overwrite)
            .await
            .unwrap();
    }

    async fn get(&self, key: &str) -> Vec<u8> {
        self.store.get(key).await.unwrap().body.to_vec()
    }

    async fn snapshot(&self, fx: &Fixture, txid: u64, epoch: u64) -> SnapshotRef {
        let meta = SnapshotMeta {
            db_name: DB.into(),
            node_id: "fixture-node".into(),
            txid,
            epoch,
            page_size: fx.page_size,
            page_count: fx.pages(txid),
            db_checksum: fx.checksum(txid),
            timestamp_ms: commit_ms(txid),
        };
        let body = codec::encode_snapshot(meta, &fx.images[txid as usize]).unwrap();
        let key = self.layout.snapshot(DB, txid);
        self.put(&key, body).await;
        SnapshotRef {
            txid,
            key,
            checksum: hex64(fx.checksum(txid)),
            size_pages: fx.pages(txid),
            taken_at: Utc
                .timestamp_millis_opt(commit_ms(txid))
                .unwrap()
                .to_rfc3339(),
        }
    }

    async fn segment(&self, fx: &Fixture, txns: &[Txn]) -> String {
        let meta = SegmentMeta {
            db_name: DB.into(),
            node_id: "fixture-node".into(),
            page_size: fx.page_size,
            created_ms: txns.last().unwrap().timestamp_ms,
        };
        let body = codec::encode_segment(&meta, txns).unwrap();
        let key = self
            .layout
            .segment(DB, txns[0].txid, txns.last().unwrap().txid);
        self.put(&key, body).await;
        key
    }

    /// Segments of BATCH transactions covering `from..=to`.
    async fn segments(&self, fx: &Fixture, from: u64, to: u64) -> Vec<String> {
        let mut keys = Vec::new();
        let mut at = from;
        while at <= to {
            let end = (at + BATCH as u64 - 1).min(to);
            keys.push(self.segment(fx, &fx.txns(at, end)).await);
            at = end + 1;
        }
        keys
    }

    fn manifest(
        &self,
        fx: &Fixture,
        head: u64,
        snapshot: SnapshotRef,
        older: Vec<SnapshotRef>,
    ) -> Manifest {
        let mut m = Manifest::new(&self.cid, "fixture-node", 1);
        m.databases.insert(
            DB.into(),
            DbManifest {
                generation: 1,
                head_txid: head,
                head_checksum: hex64(fx.checksum(head)),
                page_size: fx.page_size,
                size_pages: fx.pages(head),
                snapshot: Some(snapshot),
                older_snapshots: older,
            },
        );
        m
    }

    async fn put_manifest(&self, m: &Manifest) {
        self.put(
            &self.layout.manifest(),
            serde_json::to_vec_pretty(m).unwrap(),
        )
        .await;
    }

    /// The usual bucket: snapshots at 0 and (optionally) `mid`, segments
    /// 1..=head in batches, a manifest naming only the newest snapshot.
    async fn standard(&self, fx: &Fixture, mid: Option<u64>) -> Vec<String> {
        let s0 = self.snapshot(fx, 0, 1).await;
        let newest = match mid {
            Some(m) => self.snapshot(fx, m, 1).await,
            None => s0,
        };
        let keys = self.segments(fx, 1, fx.head()).await;
        self.put_manifest(&self.manifest(fx, fx.head(), newest, Vec::new()))
            .await;
        keys
    }

    async fn restore(&self, target: Target, out: &Path) -> Result<RestoreReport, RestoreError> {
        restore(&self.store, &self.layout, &self.cid, DB, target, out, false).await
    }
}

/// The restored file is the image after `txid`, byte for byte, passes
/// SQLite's integrity check and holds what the live database held.
fn assert_restored(fx: &Fixture, out: &Path, txid: u64) {
    let got = std::fs::read(out).unwrap();
    assert!(
        got == fx.images[txid as usize],
        "restored file differs from the image after txid {txid} ({} vs {} bytes)",
        got.len(),
        fx.images[txid as usize].len()
    );
    let c = open_image(out);
    assert_eq!(integrity(&c), "ok", "txid {txid}");
    if let Some(d) = fx.dumps.get(&txid) {
        assert_eq!(&dump(&c), d, "logical content at txid {txid}");
    }
}

/// Nothing but `expected` in `dir`: no temporary file left behind.
fn assert_dir_holds(dir: &Path, expected: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(names, want);
}

fn err_text(r: Result<RestoreReport, RestoreError>) -> (RestoreError, String) {
    let e = r.expect_err("restore should fail");
    let s = e.to_string();
    assert!(!s.contains('\n'), "one line: {s}");
    (e, s)
}

// ---------------------------------------------------------------------------
// Restore

#[tokio::test]
async fn restores_the_head_every_txid_and_points_in_time() {
    let fx = fixture();
    let r = Remote::new("restore-all");
    let n = fx.head();
    let mid = n / 2;
    r.standard(fx, Some(mid)).await;
    let dir = tempfile::tempdir().unwrap();
    let snap0 = r.layout.snapshot(DB, 0);
    let snap_mid = r.layout.snapshot(DB, mid);

    // The head: from the newest snapshot.
    let out = dir.path().join("latest.db");
    let rep = r.restore(Target::Latest, &out).await.unwrap();
    assert_restored(fx, &out, n);
    assert_eq!(rep.txid, n);
    assert_eq!(rep.checksum, fx.checksum(n));
    assert_eq!(rep.size_pages, fx.pages(n));
    assert_eq!(rep.snapshot_key, snap_mid);
    assert_eq!(rep.txns_applied, n - mid);
    assert_eq!(rep.commit_ms, Some(commit_ms(n)));
    assert!(rep.segments_applied >= 1 && rep.bytes_downloaded > 0);

    // Every txid: the older snapshot, which only the listing names, serves
    // the txids before the newer one.
    for k in 0..=n {
        let out = dir.path().join(format!("at-{k}.db"));
        let rep = r.restore(Target::Txid(k), &out).await.unwrap();
        assert_restored(fx, &out, k);
        assert_eq!(rep.txid, k);
        let want = if k >= mid { &snap_mid } else { &snap0 };
        assert_eq!(&rep.snapshot_key, want, "txid {k}");
        if k == mid || k == 0 {
            assert_eq!((rep.segments_applied, rep.commit_ms), (0, None));
        }
    }

    // Points in time: the last transaction committed at or before.
    for k in [1, 2, mid - 1, mid, mid + 1, n - 1, n] {
        for (label, at) in [("exact", commit_ms(k)), ("between", commit_ms(k) + 30_000)] {
            let out = dir.path().join(format!("time-{label}-{k}.db"));
            let t = Utc.timestamp_millis_opt(at).unwrap();
            let rep = r.restore(Target::Time(t), &out).await.unwrap();
            assert_eq!(rep.txid, k, "{label} {t}");
            assert_restored(fx, &out, k);
        }
    }
    let out = dir.path().join("now.db");
    let rep = r.restore(Target::Time(Utc::now()), &out).await.unwrap();
    assert_eq!(rep.txid, n);

    // Out of range, with clear errors and no file.
    let out = dir.path().join("nope.db");
    let (e, s) = err_text(r.restore(Target::Txid(n + 1), &out).await);
    assert!(matches!(e, RestoreError::AfterHead { .. }), "{s}");
    assert!(
        s.contains(&format!("after the head of {DB} (txid {n})")),
        "{s}"
    );
    let before = Utc.timestamp_millis_opt(T0_MS - 3_600_000).unwrap();
    let (e, s) = err_text(r.restore(Target::Time(before), &out).await);
    assert!(matches!(e, RestoreError::BeforeSnapshots { .. }), "{s}");
    assert!(
        s.contains("before the earliest available snapshot") && s.contains(&snap0),
        "{s}"
    );
    let future = Utc::now() + chrono::Duration::days(1);
    let (e, s) = err_text(r.restore(Target::Time(future), &out).await);
    assert!(matches!(e, RestoreError::InFuture { .. }), "{s}");
    assert!(!out.exists());

    // An existing file is kept unless forced; stale sidecars too.
    let latest = dir.path().join("latest.db");
    let (e, s) = err_text(r.restore(Target::Txid(3), &latest).await);
    assert!(matches!(e, RestoreError::Exists { .. }), "{s}");
    assert_restored(fx, &latest, n);
    let opts = RestoreOptions {
        progress: false,
        force: true,
    };
    let wal = dir.path().join("latest.db-wal");
    std::fs::write(&wal, b"stale").unwrap();
    restore_with(
        &r.store,
        &r.layout,
        &r.cid,
        DB,
        Target::Txid(3),
        &latest,
        opts,
    )
    .await
    .unwrap();
    assert_restored(fx, &latest, 3);
    assert!(!wal.exists(), "the replaced file's -wal was removed");
    let fresh = dir.path().join("fresh.db");
    std::fs::write(dir.path().join("fresh.db-wal"), b"stale").unwrap();
    let (e, s) = err_text(r.restore(Target::Latest, &fresh).await);
    assert!(matches!(e, RestoreError::StaleSidecar { .. }), "{s}");
    std::fs::remove_file(dir.path().join("fresh.db-wal")).unwrap();

    // Only the restored files are left.
    let mut want: Vec<String> = (0..=n).map(|k| format!("at-{k}.db")).collect();
    for k in [1, 2, mid - 1, mid, mid + 1, n - 1, n] {
        want.push(format!("time-exact-{k}.db"));
        want.push(format!("time-between-{k}.db"));
    }
    want.extend(["latest.db".into(), "now.db".into()]);
    want.sort();
    want.dedup();
    assert_dir_holds(
        dir.path(),
        &want.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

#[tokio::test]
async fn corrupt_or_truncated_segments_are_rejected_by_name() {
    let fx = fixture();
    let r = Remote::new("restore-damaged");
    let keys = r.standard(fx, None).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.db");

    // A flipped byte in the body of the second segment.
    let victim = &keys[1];
    let good = r.get(victim).await;
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    r.put(victim, bad).await;
    let (e, s) = err_text(r.restore(Target::Latest, &out).await);
    assert!(matches!(e, RestoreError::Corrupt { .. }), "{s}");
    assert!(s.starts_with(&format!("{victim}: corrupt segment:")), "{s}");
    assert!(s.contains("checksum mismatch"), "{s}");
    assert!(!out.exists());
    assert_dir_holds(dir.path(), &[]);
    // What comes before the damage is still restorable.
    let first = r.restore(Target::Txid(BATCH as u64), &out).await.unwrap();
    assert_eq!(first.txid, BATCH as u64);
    assert_restored(fx, &out, BATCH as u64);
    std::fs::remove_file(&out).unwrap();

    // A flipped byte in its header.
    let mut bad = good.clone();
    bad[30] ^= 0x01;
    r.put(victim, bad).await;
    let (_, s) = err_text(r.restore(Target::Latest, &out).await);
    assert!(
        s.starts_with(&format!(
            "{victim}: corrupt segment: header checksum mismatch"
        )),
        "{s}"
    );

    // Truncated.
    r.put(victim, good[..good.len() - 100].to_vec()).await;
    let (e, s) = err_text(r.restore(Target::Latest, &out).await);
    assert!(matches!(e, RestoreError::Corrupt { .. }), "{s}");
    assert!(
        s.starts_with(&format!("{victim}: truncated segment:")),
        "{s}"
    );
    r.put(victim, good[..20].to_vec()).await;
    let (_, s) = err_text(r.restore(Target::Latest, &out).await);
    assert!(
        s.starts_with(&format!("{victim}: truncated segment:")),
        "{s}"
    );
    assert!(!out.exists());
    assert_dir_holds(dir.path(), &[]);

    // Repaired, it restores.
    r.put(victim, good).await;
    r.restore(Target::Latest, &out).await.unwrap();
    assert_restored(fx, &out, fx.head());
}

#[tokio::test]
async fn a_txid_gap_is_rejected() {
    let fx = fixture();
    let r = Remote::new("restore-gap");
    let s0 = r.snapshot(fx, 0, 1).await;
    r.segment(fx, &fx.txns(1, 5)).await;
    let late = r.segment(fx, &fx.txns(7, 9)).await;
    r.put_manifest(&r.manifest(fx, 9, s0, Vec::new())).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.db");
    let (e, s) = err_text(r.restore(Target::Latest, &out).await);
    assert!(matches!(e, RestoreError::ChainGap { .. }), "{s}");
    assert!(
        s.contains(&format!(
            "segment {late} starts at txid 7 but the chain is at 5"
        )),
        "{s}"
    );
    assert!(s.contains("txid 6 is missing"), "{s}");
    assert!(!out.exists());
    // Up to the gap it restores; so does a time before it.
    r.restore(Target::Txid(5), &out).await.unwrap();
    assert_restored(fx, &out, 5);
    let out2 = dir.path().join("t.db");
    let t = Utc.timestamp_millis_opt(commit_ms(4) + 1).unwrap();
    assert_eq!(r.restore(Target::Time(t), &out2).await.unwrap().txid, 4);
    // A time after the gap is not.
    let out3 = dir.path().join("t3.db");
    let t = Utc.timestamp_millis_opt(commit_ms(8)).unwrap();
    let (_, s) = err_text(r.restore(Target::Time(t), &out3).await);
    assert!(s.contains("starts at txid 7 but the chain is at 5"), "{s}");
}

#[tokio::test]
async fn broken_checksum_chains_are_rejected() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();

    // Segments that chain among themselves but not from the snapshot.
    let r = Remote::new("restore-chain");
    let s0 = r.snapshot(fx, 0, 1).await;
    let mut shifted = fx.txns(1, 4);
    for t in &mut shifted {
        t.pre_checksum ^= 0xdead_beef;
        t.post_checksum ^= 0xdead_beef;
    }
    let key = r.segment(fx, &shifted).await;
    r.put_manifest(&r.manifest(fx, 4, s0.clone(), Vec::new()))
        .await;
    let (e, s) = err_text(r.restore(Target::Latest, &dir.path().join("a.db")).await);
    assert!(matches!(e, RestoreError::ChecksumChain { .. }), "{s}");
    assert!(
        s.starts_with(&format!("{key}: checksum chain mismatch at txid 1")),
        "{s}"
    );

    // A page changed in transit but the checksums kept: caught after applying.
    let mut tampered = fx.txns(1, 4);
    let page = &mut tampered[1].pages[0].1;
    let mut p = page.to_vec();
    p[100] ^= 0xff;
    *page = Bytes::from(p);
    let key = r.segment(fx, &tampered).await;
    let (e, s) = err_text(r.restore(Target::Latest, &dir.path().join("b.db")).await);
    assert!(
        matches!(e, RestoreError::PostChecksum { txid: 2, .. }),
        "{s}"
    );
    assert!(
        s.starts_with(&format!("{key}: txid 2: after applying it")),
        "{s}"
    );

    // A snapshot whose content differs from what the manifest says.
    let r2 = Remote::new("restore-snapmismatch");
    let mut s = r2.snapshot(fx, 0, 1).await;
    s.checksum = hex64(12345);
    r2.put_manifest(&r2.manifest(fx, 0, s.clone(), Vec::new()))
        .await;
    let (_, msg) = err_text(r2.restore(Target::Latest, &dir.path().join("c.db")).await);
    assert!(
        msg.starts_with(&format!("{}: snapshot holds checksum", s.key)),
        "{msg}"
    );
    assert_dir_holds(dir.path(), &[]);
}

#[tokio::test]
async fn a_deposed_primarys_tail_is_ignored() {
    let fx = fixture();
    let n = fx.head();
    let k = 10u64; // epoch 2 starts at txid k + 1
                   // Epoch 2's transactions.
    let relabel = |mut v: Vec<Txn>| {
        for t in &mut v {
            if t.txid > k {
                t.epoch = 2;
            }
        }
        v
    };
    // The deposed primary's tail: forks from the state at k with other pages.
    let decoy_of = |epoch: u64| {
        let mut v = fx.txns(k + 1, k + 2);
        let mut hashes = PageHashes::from_bytes(&fx.images[k as usize], fx.page_size).unwrap();
        for t in &mut v {
            let mut p = t.pages[0].1.to_vec();
            p[200] ^= 0x55;
            t.pages[0].1 = Bytes::from(p);
            t.pre_checksum = hashes.checksum();
            t.post_checksum = hashes
                .apply(t.pages.iter().map(|(p, d)| (*p, &d[..])), t.db_size_pages)
                .unwrap();
            t.epoch = epoch;
        }
        v
    };
    let dir = tempfile::tempdir().unwrap();
    for with_epochs in [true, false] {
        let r = Remote::new(if with_epochs {
            "deposed-epochs"
        } else {
            "deposed-noepochs"
        });
        let s0 = r.snapshot(fx, 0, 1).await;
        for (from, to) in [(1, 4), (5, 8), (9, k)] {
            r.segment(fx, &fx.txns(from, to)).await;
        }
        let mut at = k + 1;
        while at <= n {
            let end = (at + 3).min(n);
            r.segment(fx, &relabel(fx.txns(at, end))).await;
            at = end + 1;
        }
        // k+1..k+2: of epoch 1 where the history says epoch 2 owns those
        // txids; without a history, of a higher epoch than the real one, so
        // only its failure to reach the head's checksum rules it out.
        let decoy = decoy_of(if with_epochs { 1 } else { 3 });
        let decoy_key = r.segment(fx, &decoy).await;
        assert_eq!(decoy_key, r.layout.segment(DB, k + 1, k + 2));
        // And a tail past the head.
        let mut past = fx.txns(n - 1, n);
        for (i, t) in past.iter_mut().enumerate() {
            t.txid = n + 1 + i as u64;
        }
        past[0].pre_checksum = fx.checksum(n);
        past[0].post_checksum = 7;
        past[1].pre_checksum = 7;
        r.segment(fx, &past).await;

        let mut m = r.manifest(fx, n, s0, Vec::new());
        m.epoch = 2;
        if with_epochs {
            m.epochs = vec![
                EpochStart {
                    epoch: 1,
                    start_txid: [(DB.to_string(), 1)].into(),
                },
                EpochStart {
                    epoch: 2,
                    start_txid: [(DB.to_string(), k + 1)].into(),
                },
            ];
        }
        r.put_manifest(&m).await;

        for target in [k + 1, k + 2, n] {
            let out = dir.path().join(format!("{with_epochs}-{target}.db"));
            let rep = r.restore(Target::Txid(target), &out).await.unwrap();
            assert_eq!(rep.txid, target);
            assert_restored(fx, &out, target);
        }
        let out = dir.path().join(format!("{with_epochs}-latest.db"));
        r.restore(Target::Latest, &out).await.unwrap();
        assert_restored(fx, &out, n);

        if with_epochs {
            // Without the legitimate segment, the decoy alone is refused.
            let legit = r.layout.segment(DB, k + 1, k + 4);
            let body = r.get(&legit).await;
            r.store.delete(&legit).await.unwrap();
            let out = dir.path().join("refused.db");
            let (e, s) = err_text(r.restore(Target::Txid(k + 2), &out).await);
            assert!(matches!(e, RestoreError::ForeignEpoch { .. }), "{s}");
            assert!(
                s.contains(&format!("segment {decoy_key} was written in epoch 1")),
                "{s}"
            );
            r.put(&legit, body).await;
        }
    }
}

#[tokio::test]
async fn bad_manifests_and_missing_snapshots_are_named() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.db");
    let r = Remote::new("restore-manifest");
    let mkey = r.layout.manifest();

    let (e, s) = err_text(r.restore(Target::Latest, &out).await);
    assert!(matches!(e, RestoreError::NoManifest { .. }), "{s}");
    assert!(s.starts_with(&mkey), "{s}");

    r.put(&mkey, b"{\"format\": 1, \"canonical_id\": ".to_vec())
        .await;
    let (_, s) = err_text(r.restore(Target::Latest, &out).await);
    assert!(
        s.starts_with(&format!("{mkey}: not a membridge manifest")),
        "{s}"
    );

    // Names a snapshot that is not in the bucket.
    let key0 = r.layout.snapshot(DB, 0);
    let missing = SnapshotRef {
        txid: 0,
        key: key0.clone(),
        checksum: hex64(fx.checksum(0)),
        size_pages: fx.pages(0),
        taken_at: Utc::now().to_rfc3339(),
    };
    let m = r.manifest(fx, 0, missing.clone(), Vec::new());
    r.put_manifest(&m).await;
    let (e, s) = err_text(r.restore(Target::Latest, &out).await);
    assert!(matches!(e, RestoreError::MissingSnapshot { .. }), "{s}");
    assert_eq!(
        s,
        format!("{key0}: missing snapshot: the manifest names it but the bucket does not have it")
    );

    // Unparsable head checksum; unknown database.
    let mut m2 = m.clone();
    m2.databases.get_mut(DB).unwrap().head_checksum = "zz".into();
    r.put_manifest(&m2).await;
    let (_, s) = err_text(r.restore(Target::Latest, &out).await);
    assert!(
        s.starts_with(&format!("{mkey}: malformed manifest:")) && s.contains("head_checksum"),
        "{s}"
    );
    r.put_manifest(&m).await;
    let (e, s) = err_text(
        restore(
            &r.store,
            &r.layout,
            &r.cid,
            "other.db",
            Target::Latest,
            &out,
            false,
        )
        .await,
    );
    assert!(matches!(e, RestoreError::UnknownDb { .. }), "{s}");
    assert!(s.contains(DB), "{s}");

    // A corrupt snapshot frame.
    r.snapshot(fx, 0, 1).await;
    let mut body = r.get(&key0).await;
    let at = body.len() / 2;
    body[at] ^= 0x10;
    r.put(&key0, body).await;
    let (e, s) = err_text(r.restore(Target::Latest, &out).await);
    assert!(
        matches!(
            e,
            RestoreError::Corrupt {
                what: "snapshot",
                ..
            }
        ),
        "{s}"
    );
    assert!(s.starts_with(&format!("{key0}: corrupt snapshot:")), "{s}");
    assert!(!out.exists());
    assert_dir_holds(dir.path(), &[]);
}

// ---------------------------------------------------------------------------
// The CLI

fn run(env: &[(String, String)], args: &[&str]) -> Output {
    std::process::Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", "/nonexistent-home")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run membridge")
}

fn one_line(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes).to_string();
    assert_eq!(s.trim_end().lines().count(), 1, "not one line: {s:?}");
    s
}

#[tokio::test]
async fn cli_restore() {
    let fx = fixture();
    let n = fx.head();
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("restore-cli");
    let project = "restore-cli-project";
    let r = Remote::on(s3.store(&bucket), project);
    r.standard(fx, Some(n / 2)).await;
    let env = s3.env(&bucket, project);
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| -> PathBuf { dir.path().join(name) };
    let path_str = |name: &str| p(name).display().to_string();

    let latest = path_str("latest.db");
    let out = run(&env, &["restore", "--db", DB, "--to", &latest]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let line = one_line(&out.stdout);
    assert!(
        line.starts_with(&format!("restored {DB} at txid {n}")),
        "{line}"
    );
    assert!(out.stderr.is_empty(), "quiet without a terminal: {out:?}");
    assert_restored(fx, &p("latest.db"), n);

    let out = run(
        &env,
        &["restore", "--db", DB, "--to", &latest, "--txid", "3"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = one_line(&out.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_restored(fx, &p("latest.db"), n);
    let out = run(
        &env,
        &[
            "restore", "--db", DB, "--to", &latest, "--txid", "3", "--force",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_restored(fx, &p("latest.db"), 3);

    let t = Utc.timestamp_millis_opt(commit_ms(5) + 30_000).unwrap();
    let out = run(
        &env,
        &[
            "restore",
            "--db",
            DB,
            "--to",
            &path_str("t5.db"),
            "--time",
            &t.to_rfc3339(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let line = one_line(&out.stdout);
    assert!(line.contains("at txid 5, committed"), "{line}");
    assert_restored(fx, &p("t5.db"), 5);

    for (args, want) in [
        (vec!["--txid", "100000"], "after the head".to_string()),
        (
            vec!["--time", "yesterday"],
            "--time \"yesterday\": not an RFC 3339 time".to_string(),
        ),
        (
            vec!["--txid", "1", "--db", "other.db"],
            "no database \"other.db\"".to_string(),
        ),
    ] {
        let to = path_str("never.db");
        let mut a = vec!["restore", "--to", to.as_str()];
        if !args.contains(&"--db") {
            a.extend(["--db", DB]);
        }
        a.extend(args.iter().copied());
        let out = run(&env, &a);
        assert_eq!(out.status.code(), Some(1), "{a:?}: {out:?}");
        let err = one_line(&out.stderr);
        assert!(
            err.starts_with("membridge: restore") || err.starts_with("membridge: --time"),
            "{err}"
        );
        assert!(err.contains(&want), "{err}");
        assert!(!err.contains(&s3.secret_key));
        assert!(!p("never.db").exists());
    }
    assert_dir_holds(dir.path(), &["latest.db", "t5.db"]);
}

// ---------------------------------------------------------------------------
// The legacy snapshot

#[tokio::test]
async fn publish_legacy_writes_what_the_old_tool_reads() {
    let s3 = SeaweedFs::shared();
    let store = s3.store(&s3.new_bucket("legacy"));
    let project = "legacy-project";
    let cid = membridge::config::canonical_id(project);
    let layout = Layout::new(&cid);
    let dir = tempfile::tempdir().unwrap();

    let image = dir.path().join("image.db");
    {
        let c = Connection::open(&image).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE observations(id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT);
             CREATE TABLE session_summaries(id INTEGER PRIMARY KEY, s TEXT);
             CREATE TABLE user_prompts(id INTEGER PRIMARY KEY, p TEXT);
             INSERT INTO observations(body) VALUES ('a'), ('b'), ('c');
             INSERT INTO session_summaries(s) VALUES ('x'), ('y');
             INSERT INTO user_prompts(p) VALUES ('1'), ('2'), ('3'), ('4');",
        )
        .unwrap();
    }
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(bytes[18], 2, "a WAL-mode header");
    assert_dir_holds(dir.path(), &["image.db"]);

    let published = publish_legacy(&store, &layout, project, &cid, "node-a", &image)
        .await
        .unwrap();
    assert_dir_holds(dir.path(), &["image.db"]); // no sidecar was created
    let p = layout.prefix();
    assert_eq!(published.db_key, format!("{p}sqlite/claude-mem.db"));
    let db = store.get(&layout.legacy_db()).await.unwrap().body;
    assert_eq!(db, bytes);
    let sha = hex::encode(Sha256::digest(&bytes));
    let line = store.get(&layout.legacy_sha256()).await.unwrap().body;
    assert_eq!(line, format!("{sha}  claude-mem.db\n").as_bytes());
    let m: serde_json::Value =
        serde_json::from_slice(&store.get(&layout.legacy_manifest()).await.unwrap().body).unwrap();
    assert_eq!(m["project"], project);
    assert_eq!(m["canonical_id"], cid.as_str());
    assert_eq!(m["source_host"], "node-a");
    assert_eq!(m["db_size"], bytes.len() as u64);
    assert_eq!(m["sha256"], sha.as_str());
    assert_eq!(m["observations"], 3);
    assert_eq!(m["session_summaries"], 2);
    assert_eq!(m["user_prompts"], 4);
    // As the old tool writes it: the number of tables (sqlite_sequence too).
    assert_eq!(m["tables"], 4);
    assert_eq!(
        m["table_names"],
        serde_json::json!([
            "observations",
            "sqlite_sequence",
            "session_summaries",
            "user_prompts"
        ])
    );
    let ts = m["timestamp"].as_str().unwrap();
    assert!(ts.ends_with("+00:00"), "{ts}");
    let t = chrono::DateTime::parse_from_rfc3339(ts).unwrap();
    assert!((Utc::now() - t.with_timezone(&Utc)).num_seconds().abs() < 60);

    // A database without some of the tables: those counts are left out.
    let other = dir.path().join("other.db");
    {
        let c = Connection::open(&other).unwrap();
        c.execute_batch("CREATE TABLE observations(x); INSERT INTO observations VALUES (1);")
            .unwrap();
    }
    let published = publish_legacy(&store, &layout, project, &cid, "node-b", &other)
        .await
        .unwrap();
    assert_eq!(published.manifest.user_prompts, None);
    let m: serde_json::Value =
        serde_json::from_slice(&store.get(&layout.legacy_manifest()).await.unwrap().body).unwrap();
    assert_eq!(m["observations"], 1);
    assert!(
        m.get("session_summaries").is_none() && m.get("user_prompts").is_none(),
        "{m}"
    );
    assert_eq!(m["tables"], 1);

    // Not a database: a clear error, nothing uploaded over the good copy.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![7u8; 8192]).unwrap();
    let e = publish_legacy(&store, &layout, project, &cid, "node-c", &junk)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("junk.db"), "{e}");
    assert_eq!(
        store.get(&layout.legacy_db()).await.unwrap().body,
        std::fs::read(&other).unwrap()
    );
}
