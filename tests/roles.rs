//! Roles through a real mount: a node that does not hold the lease reads its
//! databases (the WAL databases they are) but refuses writes, keeps local
//! paths writable, and refuses `push` with exit code 3.

mod common;

use std::time::Duration;

use common::mount::Mount;
use common::SeaweedFs;

const DB: &str = "claude-mem.db";

/// A WAL-mode database with rows, made on the bare directory before mounting.
fn seeded_db() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB);
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE observations(id INTEGER PRIMARY KEY, text TEXT);
         INSERT INTO observations(text) VALUES ('one'), ('two'), ('three');
         PRAGMA wal_checkpoint(TRUNCATE);",
    )
    .unwrap();
    drop(c);
    std::fs::read(path).unwrap()
}

fn secondary(tag: &str) -> Mount {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket(tag), tag);
    env.push(("MEMBRIDGE_NODE_ID".into(), "laptop".into()));
    env.push(("PRIMARY_NODE_ID".into(), "desktop".into()));
    Mount::with_files(env, &[(DB, &seeded_db()), ("claude-mem.db-wal", b"")])
}

#[test]
fn a_non_primary_reads_and_refuses_writes_on_the_wal_database() {
    let m = secondary("ro");
    assert_eq!(m.status()["role"], "secondary");
    let db = m.dir.join(DB);
    let c = rusqlite::Connection::open(&db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM observations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 3);
    // The view is the WAL database it is (docs/ARCHITECTURE.md): the pragma
    // claude-mem's worker runs at connect succeeds.
    let mode: String = c
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    for _ in 0..3 {
        let e = c
            .execute("INSERT INTO observations(text) VALUES ('four')", [])
            .unwrap_err();
        assert!(e.to_string().contains("disk I/O error"), "{e}");
    }
    assert_eq!(m.status()["databases"][DB]["refused_writes"], 3);
    // the same connection still reads
    let n: i64 = c
        .query_row("SELECT count(*) FROM observations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 3);
    // local paths stay writable
    std::fs::create_dir_all(m.dir.join("logs")).unwrap();
    std::fs::write(m.dir.join("logs/worker.log"), b"started\n").unwrap();
    std::fs::write(m.dir.join("worker.pid"), b"123\n").unwrap();
    drop(c);
    // one log line per refused transaction, not per write (and one for the
    // last connection's checkpoint at close: nobody else had it open here)
    let log = std::fs::read_to_string(m.status()["log_file"].as_str().unwrap()).unwrap();
    let refusals = log.matches("refused a write transaction").count();
    assert!(
        (3..=4).contains(&refusals),
        "{refusals} refusal lines:\n{log}"
    );
    m.unmount();
    assert_eq!(
        std::fs::read(m.dir.join("logs/worker.log")).unwrap(),
        b"started\n"
    );
}

#[test]
fn push_on_a_non_primary_exits_3() {
    let m = secondary("push3");
    let out = m.run(&["push"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("only the primary publishes"), "{err}");
}

#[test]
fn a_lone_auto_node_takes_the_lease_and_writes() {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("auto"), "auto");
    env.push(("MEMBRIDGE_NODE_ID".into(), "solo".into()));
    let m = Mount::with_files(env, &[(DB, &seeded_db())]);
    let st = m.status();
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["epoch"], 1, "{st}");
    let c = rusqlite::Connection::open(m.dir.join(DB)).unwrap();
    c.execute("INSERT INTO observations(text) VALUES ('four')", [])
        .unwrap();
    let out = m.run(&["leadership", "info"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("solo"), "{text}");
}

/// Issue 11, item 6: fallocate and copy_file_range on a non-primary's
/// database go through the same role check as write (a hole punched in it,
/// or a file copied over it, would change the copy it serves), and a copy
/// *from* it gives what a read gives (the presented view).
#[test]
fn a_non_primary_refuses_fallocate_and_copy_file_range_onto_databases() {
    use std::os::fd::AsRawFd;
    let m = secondary("falloc");
    let db = m.dir.join(DB);
    let before = std::fs::read(&db).unwrap();
    let errno = || std::io::Error::last_os_error().raw_os_error();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&db)
        .unwrap();
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: no pointers; `f` is open for the call.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, 4096) };
    assert_eq!((rc, errno()), (-1, Some(libc::EACCES)), "punch hole");
    std::fs::write(m.dir.join("backup.db"), vec![7u8; 4096]).unwrap();
    let src = std::fs::File::open(m.dir.join("backup.db")).unwrap();
    let (mut off_in, mut off_out) = (0i64, 0i64);
    // SAFETY: both fds are open; the offsets are live locals the kernel updates.
    let n = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            f.as_raw_fd(),
            &mut off_out,
            4096,
            0,
        )
    };
    assert_eq!((n, errno()), (-1, Some(libc::EACCES)), "copy onto the db");
    drop(f);
    assert!(
        std::fs::read(&db).unwrap() == before,
        "the database changed"
    );

    let src = std::fs::File::open(&db).unwrap();
    let out = std::fs::File::create(m.dir.join("copy.db")).unwrap();
    let (mut off_in, mut off_out) = (0i64, 0i64);
    while (off_in as usize) < before.len() {
        // SAFETY: as above.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                out.as_raw_fd(),
                &mut off_out,
                before.len() - off_in as usize,
                0,
            )
        };
        assert!(n > 0, "copy from the db: {n} {:?}", errno());
    }
    drop(out);
    assert!(
        std::fs::read(m.dir.join("copy.db")).unwrap() == before,
        "a copy of the database differs from a read of it"
    );
}

fn wait_for_role(m: &Mount, role: &str, limit: Duration) -> serde_json::Value {
    let t = std::time::Instant::now();
    loop {
        let st = m.status();
        if st["role"] == role {
            return st;
        }
        assert!(
            t.elapsed() < limit,
            "never {role}: {st}\n{}",
            m.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 11, item 8: giving the lease up on purpose (`leadership release`,
/// unmount) is a release, not a loss: no "lease lost" warning, no fencing,
/// and the role history says it was released.
#[test]
fn releasing_the_lease_is_not_a_loss() {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("release"), "release");
    env.push(("MEMBRIDGE_NODE_ID".into(), "solo".into()));
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), "3".into()));
    let m = Mount::with_files(env, &[(DB, &seeded_db())]);
    assert_eq!(m.status()["role"], "primary");
    let c = rusqlite::Connection::open(m.dir.join(DB)).unwrap();
    c.execute("INSERT INTO observations(text) VALUES ('four')", [])
        .unwrap();
    drop(c);
    let log_path = m.status()["log_file"].as_str().unwrap().to_string();

    let out = m.run(&["leadership", "release"]);
    assert!(out.status.success(), "{out:?}");
    let st = wait_for_role(&m, "secondary", Duration::from_secs(10));
    let last = st["role_history"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["from"], "primary", "{st}");
    assert!(
        last["reason"].as_str().unwrap_or("").contains("released"),
        "{st}"
    );
    assert!(st["divergent"].as_array().unwrap().is_empty(), "{st}");
    // A lone candidate takes it again once its release backoff is over.
    wait_for_role(&m, "primary", Duration::from_secs(15));
    m.unmount();

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("released the lease"), "{log}");
    for bad in ["lease lost", "fenced"] {
        assert!(!log.contains(bad), "{bad:?} in the log:\n{log}");
    }
}

/// Issue 15, item 7: a lease whose epoch is below the manifest's (an old tool
/// rewrote the lease with its own count) is taken again above both, at once,
/// instead of catching up for ever with a line in the log every retry.
#[test]
fn a_lease_epoch_below_the_manifests_is_taken_again_above_both() {
    use membridge::replica::manifest::{self, EpochStart};
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("epoch-below");
    let mut env = s3.env(&bucket, "epoch-below");
    env.push(("MEMBRIDGE_NODE_ID".into(), "solo".into()));
    let m = Mount::with_files(env, &[(DB, &seeded_db())]);
    assert_eq!(m.status()["role"], "primary");
    let log_path = m.status()["log_file"].as_str().unwrap().to_string();
    m.unmount(); // publishes, then releases the lease at epoch 1

    // The manifest moved on to epoch 7 under leases that are gone.
    let cfg = s3.config(&bucket, "epoch-below");
    let (store, layout) = (s3.store(&bucket), cfg.layout());
    common::block_on(async {
        let v = manifest::load(&store, &layout, &cfg.canonical_id)
            .await
            .unwrap()
            .unwrap();
        let mut next = v.manifest.clone();
        next.epoch = 7;
        next.epochs.push(EpochStart {
            epoch: 7,
            start_txid: next
                .databases
                .iter()
                .map(|(db, d)| (db.clone(), d.head_txid + 1))
                .collect(),
        });
        manifest::swap(&store, &layout, Some(&v.etag), &next)
            .await
            .unwrap();
    });

    // Mounted again, it takes the released lease at epoch 2, then above 7.
    m.mount();
    let st = wait_for_role(&m, "primary", Duration::from_secs(20));
    assert_eq!(st["epoch"], 8, "{st}");
    assert!(st["last_error"].is_null(), "{st}");
    let c = rusqlite::Connection::open(m.dir.join(DB)).unwrap();
    c.execute("INSERT INTO observations(text) VALUES ('after')", [])
        .unwrap();
    drop(c);
    let m8 = common::block_on(manifest::load(&store, &layout, &cfg.canonical_id))
        .unwrap()
        .unwrap();
    assert_eq!(m8.manifest.epoch, 8);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("taking it again above both"), "{log}");
    assert!(
        log.matches("catching up before taking writes").count() <= 1,
        "{log}"
    );
}
