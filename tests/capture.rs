//! Transaction capture on the primary, end to end: SQLite writes through a real
//! mount, the daemon journals and uploads them to a real S3 server, and
//! `membridge restore` rebuilds exactly what SQLite committed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::mount::Mount;
use common::SeaweedFs;

const DB: &str = "claude-mem.db";

fn env_for(s3: &SeaweedFs, tag: &str) -> Vec<(String, String)> {
    let mut env = s3.env(&s3.new_bucket(tag), tag);
    env.push(("MEMBRIDGE_NODE_ID".into(), "primary-1".into()));
    env
}

/// `sqlite3 FILE .dump`: the logical content, independent of page layout.
fn dump(path: &Path) -> String {
    let out = Command::new("sqlite3")
        .arg(path)
        .arg(".dump")
        .output()
        .expect("sqlite3 CLI (installed by scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn integrity(path: &Path) -> String {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

fn db_status(m: &Mount) -> serde_json::Value {
    m.status()["databases"][DB].clone()
}

/// Wait until everything captured is in the bucket.
fn wait_drained(m: &Mount, limit: Duration) -> u64 {
    let t = Instant::now();
    loop {
        let s = db_status(m);
        let (head, up) = (s["head_txid"].as_u64(), s["uploaded_txid"].as_u64());
        if let (Some(h), Some(u)) = (head, up) {
            if h == u && s["backlog"].as_u64() == Some(0) {
                return h;
            }
        }
        if t.elapsed() > limit {
            let log = std::fs::read_to_string(m.status()["log_file"].as_str().unwrap_or(""))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "backlog did not drain: {s}\n--- daemon log ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn head_txid(m: &Mount) -> u64 {
    db_status(m)["head_txid"].as_u64().unwrap()
}

fn restore(m: &Mount, to: &Path, txid: Option<u64>) -> std::process::Output {
    let mut args = vec![
        "restore".to_string(),
        "--db".into(),
        DB.into(),
        "--to".into(),
        to.display().to_string(),
    ];
    if let Some(t) = txid {
        args.push("--txid".into());
        args.push(t.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    m.run(&args)
}

fn restore_ok(m: &Mount, to: &Path, txid: Option<u64>) {
    let out = restore(m, to, txid);
    assert!(
        out.status.success(),
        "restore failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn open(path: &Path, mode: &str) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let _: String = c
        .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
        .unwrap();
    c.execute_batch("PRAGMA synchronous=NORMAL").unwrap();
    c
}

/// 5,000 mixed transactions: inserts, updates, deletes, a schema change, a
/// VACUUM, a rolled-back transaction and (in WAL mode) checkpoints of every
/// kind. Returns (txid, dump) taken in the middle.
fn workload(m: &Mount, db: &Path, mode: &str) -> (u64, String) {
    let mut c = open(db, mode);
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS observations(id INTEGER PRIMARY KEY, text TEXT, n INTEGER);
         CREATE TABLE IF NOT EXISTS user_prompts(id INTEGER PRIMARY KEY, prompt TEXT);",
    )
    .unwrap();
    let mut middle = None;
    for i in 0..5000u32 {
        match i % 10 {
            0..=5 => {
                c.execute(
                    "INSERT INTO observations(text, n) VALUES (?1, ?2)",
                    rusqlite::params![
                        format!("observation {i} {}", "x".repeat((i % 97) as usize)),
                        i
                    ],
                )
                .unwrap();
            }
            6 | 7 => {
                c.execute(
                    "UPDATE observations SET n = n + 1, text = text || '!' WHERE id % 7 = ?1",
                    [i % 7],
                )
                .unwrap();
            }
            8 => {
                c.execute("DELETE FROM observations WHERE id % 13 = ?1", [i % 13])
                    .unwrap();
            }
            _ => {
                let tx = c.transaction().unwrap();
                tx.execute(
                    "INSERT INTO user_prompts(prompt) VALUES (?1)",
                    [format!("p{i}")],
                )
                .unwrap();
                tx.execute("UPDATE observations SET n = -1 WHERE id = ?1", [i])
                    .unwrap();
                tx.commit().unwrap();
            }
        }
        match i {
            1000 => {
                let tx = c.transaction().unwrap();
                tx.execute("DELETE FROM observations", []).unwrap();
                tx.rollback().unwrap();
            }
            1500 => c
                .execute_batch("ALTER TABLE observations ADD COLUMN tag TEXT; CREATE INDEX obs_n ON observations(n);")
                .unwrap(),
            2000 => c.execute_batch("VACUUM").unwrap(),
            2500 => {
                middle = Some((head_txid(m), dump(db)));
            }
            _ => {}
        }
        if mode == "wal" && i % 700 == 350 {
            let kind = ["PASSIVE", "FULL", "RESTART", "TRUNCATE"][(i / 700) as usize % 4];
            c.query_row(&format!("PRAGMA wal_checkpoint({kind})"), [], |_| Ok(()))
                .unwrap();
        }
    }
    if mode == "wal" {
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    middle.unwrap()
}

fn restore_matches_live(mode: &str) {
    let s3 = SeaweedFs::shared();
    let m = Mount::with_files(env_for(s3, &format!("cap-{mode}")), &[]);
    let db = m.dir.join(DB);
    let (mid_txid, mid_dump) = workload(&m, &db, mode);
    let head = wait_drained(&m, Duration::from_secs(60));
    assert!(head >= 5000, "only {head} transactions captured");
    let tmp = tempfile::tempdir().unwrap();
    let latest = tmp.path().join("latest.db");
    restore_ok(&m, &latest, None);
    assert_eq!(integrity(&latest), "ok");
    assert_eq!(
        dump(&latest),
        dump(&db),
        "restored database differs from the live one"
    );
    let mid = tmp.path().join("mid.db");
    restore_ok(&m, &mid, Some(mid_txid));
    assert_eq!(integrity(&mid), "ok");
    assert_eq!(
        dump(&mid),
        mid_dump,
        "restore to txid {mid_txid} is not the state after it"
    );
}

#[test]
fn wal_mode_workload_restores_exactly() {
    restore_matches_live("wal");
}

#[test]
fn delete_mode_workload_restores_exactly() {
    restore_matches_live("delete");
}

#[test]
fn truncate_mode_workload_restores_exactly() {
    restore_matches_live("truncate");
}

#[test]
fn persist_mode_workload_restores_exactly() {
    restore_matches_live("persist");
}

fn bucket_of(env: &[(String, String)]) -> String {
    env.iter()
        .find(|(k, _)| k == "MINIO_BUCKET")
        .unwrap()
        .1
        .clone()
}

/// Every object of the project: (key, size).
fn objects(s3: &SeaweedFs, bucket: &str) -> Vec<(String, u64)> {
    common::block_on(async {
        use membridge::remote::ObjectStore;
        s3.store(bucket).list("projects/").await.unwrap()
    })
    .into_iter()
    .map(|o| (o.key, o.size))
    .collect()
}

fn segment_bytes(s3: &SeaweedFs, bucket: &str) -> u64 {
    objects(s3, bucket)
        .iter()
        .filter(|(k, _)| k.ends_with(".seg"))
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn one_row_insert_into_a_50mb_database_uploads_a_few_pages() {
    let s3 = SeaweedFs::shared();
    let env = env_for(s3, "bytes");
    let bucket = bucket_of(&env);
    // A 50 MB database on the bare directory, before the mount.
    let seed = tempfile::tempdir().unwrap();
    let seed_db = seed.path().join(DB);
    {
        let c = open(&seed_db, "wal");
        c.execute_batch("CREATE TABLE blobs(id INTEGER PRIMARY KEY, b BLOB)")
            .unwrap();
        for _ in 0..50 {
            c.execute("INSERT INTO blobs(b) VALUES (randomblob(1000000))", [])
                .unwrap();
        }
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    let bytes = std::fs::read(&seed_db).unwrap();
    assert!(bytes.len() > 50_000_000);
    let m = Mount::with_files(env, &[(DB, &bytes)]);
    wait_drained(&m, Duration::from_secs(120));
    let before = segment_bytes(s3, &bucket);
    let c = open(&m.dir.join(DB), "wal");
    c.execute("INSERT INTO blobs(b) VALUES (x'01020304')", [])
        .unwrap();
    drop(c);
    wait_drained(&m, Duration::from_secs(30));
    let uploaded = segment_bytes(s3, &bucket) - before;
    println!("one single-row insert into a 50 MB database uploaded {uploaded} bytes");
    assert!(
        uploaded > 0 && uploaded < 64 * 1024,
        "uploaded {uploaded} bytes"
    );
}

#[test]
fn kill_9_mid_burst_loses_no_committed_transaction() {
    kill_9_mid_burst(false);
}

/// The same with the writer served by the kernel (issue 12): its commits
/// are tailed from the WAL, and the daemon's death must not let it write on
/// unseen.
#[test]
fn kill_9_mid_burst_of_a_kernel_served_writer_loses_no_committed_transaction() {
    kill_9_mid_burst(true);
}

fn kill_9_mid_burst(kernel: bool) {
    let s3 = SeaweedFs::shared();
    let m = Mount::with_files(env_for(s3, "kill"), &[]);
    let db = m.dir.join(DB);
    let c = open(&db, "wal");
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    drop(c);
    let served = || m.status()["io"]["databases"][DB].as_str().map(String::from);
    if kernel {
        common::wait_for(
            "the kernel to serve the database",
            Duration::from_secs(10),
            || served().as_deref() == Some("kernel"),
        );
    }
    let path = db.clone();
    let writer = std::thread::spawn(move || {
        let c = open(&path, "wal");
        let mut committed = 0u64;
        for i in 0..100_000u64 {
            if c.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {i}")])
                .is_err()
            {
                break;
            }
            committed += 1;
        }
        committed
    });
    std::thread::sleep(Duration::from_millis(1500));
    let pid = nix::unistd::Pid::from_raw(m.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let committed = writer.join().unwrap();
    assert!(
        committed > 0 && committed < 100_000,
        "committed {committed}"
    );
    m.mount(); // clears the stale mount and reconciles the journal
    if kernel {
        common::wait_for(
            "the kernel to serve the database again",
            Duration::from_secs(10),
            || served().as_deref() == Some("kernel"),
        );
    }
    wait_drained(&m, Duration::from_secs(60));
    assert_eq!(integrity(&db), "ok");
    let live: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    let live = live as u64;
    assert!(live >= committed, "{live} rows, {committed} committed");
    let tmp = tempfile::tempdir().unwrap();
    let restored = tmp.path().join("r.db");
    restore_ok(&m, &restored, None);
    assert_eq!(
        dump(&restored),
        dump(&db),
        "the bucket lacks committed transactions"
    );
}

#[test]
fn bucket_outage_of_20s_loses_nothing_and_status_shows_it() {
    let s3 = SeaweedFs::start(); // our own server: this test stops it
    let mut env = env_for(&s3, "outage");
    // A primary that cannot renew its lease must stop writing (DESIGN §4):
    // the lease has to outlive the outage for writes to go on. With the
    // default 30 s TTL, renewed every 10 s, a 20 s outage may outlast it.
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), "120".into()));
    let m = Mount::with_files(env, &[]);
    let db = m.dir.join(DB);
    let c = open(&db, "wal");
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    for i in 0..50 {
        c.execute("INSERT INTO t(v) VALUES (?1)", [format!("before {i}")])
            .unwrap();
    }
    wait_drained(&m, Duration::from_secs(30));
    s3.stop();
    let t = Instant::now();
    let mut i = 0;
    while t.elapsed() < Duration::from_secs(20) {
        c.execute("INSERT INTO t(v) VALUES (?1)", [format!("during {i}")])
            .unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = m.status();
    assert_eq!(during["upload_state"], "unreachable", "{during}");
    assert!(
        during["databases"][DB]["backlog"].as_u64().unwrap() > 0,
        "{during}"
    );
    assert!(during["last_outage"]["to"].is_null(), "{during}");
    s3.restart();
    wait_drained(&m, Duration::from_secs(60));
    let after = m.status();
    assert_eq!(after["upload_state"], "ok", "{after}");
    assert!(after["last_outage"]["to"].is_string(), "{after}");
    drop(c);
    let tmp = tempfile::tempdir().unwrap();
    let restored = tmp.path().join("r.db");
    restore_ok(&m, &restored, None);
    assert_eq!(dump(&restored), dump(&db));
}

#[test]
fn push_publishes_a_snapshot_at_the_head() {
    let s3 = SeaweedFs::shared();
    let env = env_for(s3, "push");
    let bucket = bucket_of(&env);
    let m = Mount::with_files(env, &[]);
    let db = m.dir.join(DB);
    let c = open(&db, "wal");
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    for i in 0..30 {
        c.execute("INSERT INTO t(v) VALUES (?1)", [format!("r{i}")])
            .unwrap();
    }
    let head = head_txid(&m);
    let out = m.run(&["push"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("{DB} at txid {head}")), "{text}");
    let snaps: Vec<String> = objects(s3, &bucket)
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.ends_with(".snap"))
        .collect();
    assert!(
        snaps
            .iter()
            .any(|k| k.ends_with(&format!("{head:016x}.snap"))),
        "{snaps:?}"
    );
    drop(c);
    m.unmount();
    // no daemon: a one-line error and exit 1
    let out = m.run(&["push"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no membridge daemon"), "{err}");
}

#[test]
fn changes_made_while_unmounted_start_a_new_generation() {
    let s3 = SeaweedFs::shared();
    let m = Mount::with_files(env_for(s3, "gen"), &[]);
    let db = m.dir.join(DB);
    let c = open(&db, "wal");
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    for i in 0..10 {
        c.execute("INSERT INTO t(v) VALUES (?1)", [format!("mounted {i}")])
            .unwrap();
    }
    drop(c);
    let first_head = wait_drained(&m, Duration::from_secs(30));
    let tmp = tempfile::tempdir().unwrap();
    let old = tmp.path().join("old.db");
    restore_ok(&m, &old, None);
    m.unmount();
    // Someone writes the bare directory while membridge is not mounted.
    let c = open(&db, "wal");
    c.execute("INSERT INTO t(v) VALUES ('behind membridge''s back')", [])
        .unwrap();
    drop(c);
    m.mount();
    let head = wait_drained(&m, Duration::from_secs(30));
    assert!(head > first_head, "the new generation must not reuse txids");
    let log = std::fs::read_to_string(
        std::fs::read_dir(&m.state)
            .unwrap()
            .flatten()
            .map(|e| e.path().join("membridge.log"))
            .find(|p| p.exists())
            .unwrap(),
    )
    .unwrap();
    assert!(log.contains("starting a new generation"), "{log}");
    let new = tmp.path().join("new.db");
    restore_ok(&m, &new, None);
    assert_eq!(dump(&new), dump(&db));
    // the old generation's history is still restorable
    let again = tmp.path().join("again.db");
    restore_ok(&m, &again, Some(first_head));
    assert_eq!(dump(&again), dump(&old));
}

#[test]
fn legacy_snapshot_is_published_for_old_tool_nodes() {
    let s3 = SeaweedFs::shared();
    let env = env_for(s3, "legacy");
    let bucket = bucket_of(&env);
    let m = Mount::with_files(env, &[]);
    let db = m.dir.join(DB);
    let c = open(&db, "wal");
    c.execute_batch(
        "CREATE TABLE observations(id INTEGER PRIMARY KEY, text TEXT);
         CREATE TABLE user_prompts(id INTEGER PRIMARY KEY, prompt TEXT);",
    )
    .unwrap();
    for i in 0..7 {
        c.execute(
            "INSERT INTO observations(text) VALUES (?1)",
            [format!("o{i}")],
        )
        .unwrap();
    }
    c.execute("INSERT INTO user_prompts(prompt) VALUES ('p')", [])
        .unwrap();
    drop(c);
    let out = m.run(&["push"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = s3.store(&bucket);
    let cid = m.status()["canonical_id"].as_str().unwrap().to_string();
    let get = |k: &str| {
        common::block_on(async {
            use membridge::remote::ObjectStore;
            store
                .get(&format!("projects/{cid}/sqlite/{k}"))
                .await
                .unwrap()
                .body
        })
    };
    let image = get("claude-mem.db");
    let sha = get("claude-mem.db.sha256");
    let manifest: serde_json::Value = serde_json::from_slice(&get("manifest.json")).unwrap();
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(&image));
    assert_eq!(
        std::str::from_utf8(&sha).unwrap(),
        format!("{digest}  claude-mem.db\n")
    );
    assert_eq!(manifest["sha256"], digest);
    assert_eq!(manifest["db_size"], image.len() as u64);
    assert_eq!(manifest["observations"], 7);
    assert_eq!(manifest["user_prompts"], 1);
    assert!(manifest["session_summaries"].is_null());
    assert_eq!(manifest["canonical_id"], cid.as_str());
    assert_eq!(manifest["project"], "legacy");
    // An old-style pull: the downloaded file opens as the database.
    let tmp = tempfile::tempdir().unwrap();
    let pulled = tmp.path().join(DB);
    std::fs::write(&pulled, &image).unwrap();
    assert_eq!(integrity(&pulled), "ok");
    assert_eq!(dump(&pulled), dump(&db));
}

#[test]
fn snapshots_every_n_transactions_restore_by_time_and_prune() {
    let s3 = SeaweedFs::shared();
    let mut env = env_for(s3, "cadence");
    env.push(("MEMBRIDGE_SNAPSHOT_TXNS".into(), "25".into()));
    let bucket = bucket_of(&env);
    let mut m = Mount::with_files(env, &[]);
    let db = m.dir.join(DB);
    let c = open(&db, "wal");
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    let mut marks = Vec::new(); // (time, txid, dump) along the way
    for burst in 0..4 {
        for i in 0..30 {
            c.execute("INSERT INTO t(v) VALUES (?1)", [format!("{burst}-{i}")])
                .unwrap();
        }
        wait_drained(&m, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(1100));
        marks.push((chrono::Utc::now(), head_txid(&m), dump(&db)));
        std::thread::sleep(Duration::from_millis(1100));
    }
    let keys = |bucket: &str| -> Vec<String> {
        common::block_on(async {
            use membridge::remote::ObjectStore;
            s3.store(bucket).list("projects/").await.unwrap()
        })
        .into_iter()
        .map(|o| o.key)
        .collect()
    };
    let snaps = keys(&bucket)
        .iter()
        .filter(|k| k.ends_with(".snap"))
        .count();
    assert!(
        snaps >= 4,
        "expected a snapshot every 25 transactions, found {snaps}"
    );
    // --time picks the state as of that moment
    let tmp = tempfile::tempdir().unwrap();
    let (when, _, want) = &marks[1];
    let at = tmp.path().join("at.db");
    let out = m.run(&[
        "restore",
        "--db",
        DB,
        "--to",
        at.to_str().unwrap(),
        "--time",
        &when.to_rfc3339(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&dump(&at), want);
    drop(c);
    m.unmount();

    // Retention 0: remount, publish, and everything before the newest
    // snapshot goes; restore still reaches the head but not the pruned past.
    let early = marks[0].1;
    m.env.push(("MEMBRIDGE_RETENTION_DAYS".into(), "0".into()));
    let m2 = m;
    m2.mount();
    assert!(m2.run(&["push"]).status.success());
    let t = Instant::now();
    while keys(&bucket)
        .iter()
        .filter(|k| k.ends_with(".snap"))
        .count()
        > 1
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "old snapshots not pruned"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let latest = tmp.path().join("latest.db");
    restore_ok(&m2, &latest, None);
    assert_eq!(dump(&latest), dump(&db));
    let out = restore(&m2, &tmp.path().join("old.db"), Some(early));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("before the earliest available snapshot"),
        "{out:?}"
    );
}

/// Issue 11, item 6: `cp backups/x.db claude-mem.db` inside the mount on the
/// primary (copy_file_range, as coreutils does) changes the database through
/// capture like a write: the bucket gets the transaction, and a restore
/// gives the copied database.
#[test]
fn copy_file_range_onto_the_database_is_captured() {
    use std::os::fd::AsRawFd;
    let s3 = SeaweedFs::shared();
    let m = Mount::with_files(env_for(s3, "cfr"), &[]);
    let db = m.dir.join(DB);
    let c = open(&db, "delete");
    c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(c);
    let before = wait_drained(&m, Duration::from_secs(30));
    std::fs::create_dir_all(m.dir.join("backups")).unwrap();
    let backup = m.dir.join("backups/x.db");
    let c = open(&backup, "delete");
    c.execute_batch(
        "CREATE TABLE t(x); INSERT INTO t VALUES (1), (2), (3);
         CREATE TABLE u(y); INSERT INTO u VALUES (randomblob(5000));",
    )
    .unwrap();
    drop(c);
    let len = std::fs::metadata(&backup).unwrap().len() as usize;
    let src = std::fs::File::open(&backup).unwrap();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&db)
        .unwrap();
    let (mut off_in, mut off_out) = (0i64, 0i64);
    while (off_in as usize) < len {
        // SAFETY: both fds are open for the call; `off_in`/`off_out` are live
        // locals the kernel updates; no buffer of ours is involved.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                len - off_in as usize,
                0,
            )
        };
        assert!(n > 0, "{n}: {}", std::io::Error::last_os_error());
    }
    // Captured at fsync or at the last close; FUSE releases asynchronously.
    dst.sync_all().unwrap();
    drop(dst);
    let after = wait_drained(&m, Duration::from_secs(30));
    assert!(
        after > before,
        "the copy was not captured ({before} -> {after})"
    );
    let tmp = tempfile::tempdir().unwrap();
    let restored = tmp.path().join("r.db");
    restore_ok(&m, &restored, None);
    assert_eq!(dump(&restored), dump(&backup));
}
