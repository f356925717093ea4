//! The secondary presents each replicated database as the WAL database it is
//! (issue 10; docs/ARCHITECTURE.md, "The view on a secondary"): a client that
//! runs `PRAGMA journal_mode = WAL` at connect works, a reader's snapshot is
//! never disturbed and never waits, write transactions that change nothing
//! succeed while real writes are refused, and the
//! file is byte-exact after a hand-over even when the primary's SQLite is not
//! membridge's own (page 1 carries the writer's library version).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::SeaweedFs;
use common::{node, wait_for};

const DB: &str = "claude-mem.db";

/// The `sqlite3` CLI (Debian's SQLite, not the bundled one) on `db`.
fn cli(db: &Path, sql: &str) -> Result<String, String> {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("sqlite3 CLI (scripts/install-deps.sh installs it)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn rows(c: &rusqlite::Connection) -> i64 {
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_secondary_is_a_wal_database_for_its_clients_and_exact_after_hand_over() {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("walview"), "walview");
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), "6".into()));
    let a = node(&env, "node-a");
    assert_eq!(a.status()["role"], "primary");
    let adb = a.dir.join(DB);
    // The primary's writer is the CLI: another SQLite version stamps page 1.
    cli(
        &adb,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
         INSERT INTO t(v) VALUES ('a1');",
    )
    .unwrap();
    let b = node(&env, "node-b");
    assert_eq!(b.status()["role"], "secondary");
    let bdb = b.dir.join(DB);
    assert!(b.run(&["pull"]).status.success());

    // claude-mem's worker: one long-lived connection, WAL pragma at connect,
    // no busy timeout needed for reads.
    let worker = rusqlite::Connection::open(&bdb).unwrap();
    let mode: String = worker
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .expect("PRAGMA journal_mode = WAL on a secondary");
    assert_eq!(mode, "wal");
    assert_eq!(rows(&worker), 1);

    // A reader mid-transaction keeps its snapshot while the view advances.
    let snap = rusqlite::Connection::open(&bdb).unwrap();
    snap.execute_batch("BEGIN").unwrap();
    assert_eq!(rows(&snap), 1);
    for i in 0..20 {
        // Schema changes and growth: page 1 is in these transactions.
        cli(
            &adb,
            &format!(
                "INSERT INTO t(v) VALUES ('a{i}'); CREATE TABLE IF NOT EXISTS u{} (x);",
                i % 3
            ),
        )
        .unwrap();
    }
    assert!(b.run(&["pull"]).status.success());
    assert_eq!(rows(&snap), 1, "a reader's snapshot moved under it");
    snap.execute_batch("COMMIT").unwrap();
    assert_eq!(rows(&snap), 21);
    assert_eq!(rows(&worker), 21);
    // Another SQLite (the CLI, no busy timeout) reads the view too.
    assert_eq!(cli(&bdb, "SELECT count(*) FROM t").unwrap(), "21");

    // A write transaction that changes nothing succeeds (claude-mem's worker
    // runs dozens at every start); a real write fails at once, and the
    // refused frames never reach the view.
    worker
        .execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
        .expect("a no-op write transaction on a secondary");
    worker
        .execute("INSERT OR IGNORE INTO t(id, v) VALUES (1, 'a1')", [])
        .expect("INSERT OR IGNORE of an existing row on a secondary");
    let t = Instant::now();
    let e = worker
        .execute("INSERT INTO t(v) VALUES ('nope')", [])
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(e.to_string().contains("disk I/O error"), "{e}");
    assert!(cli(&bdb, "INSERT INTO t(v) VALUES ('nope')").is_err());
    assert_eq!(rows(&worker), 21);
    assert_eq!(cli(&bdb, "SELECT count(*) FROM t").unwrap(), "21");
    drop(snap);
    drop(worker);

    // A restarted secondary keeps its copy: the page 1 its own SQLite stamped
    // is put back before the copy is compared with the bucket's head, so
    // nothing is downloaded again (and `unmount` is not kept busy by the
    // daemon's own connection).
    b.unmount();
    b.mount();
    assert!(b.run(&["pull"]).status.success());
    let log = std::fs::read_to_string(b.status()["log_file"].as_str().unwrap()).unwrap();
    assert_eq!(
        log.matches("serving from the bucket while the local copy hydrates")
            .count()
            + log.matches("local copy rebuilt from the bucket").count(),
        1,
        "the restarted secondary fetched its database again:\n{log}"
    );
    assert_eq!(cli(&bdb, "SELECT count(*) FROM t").unwrap(), "21");

    // Hand over: B's file must be exactly the bucket's head for its capture
    // to continue the chain; A then follows B's transactions.
    let out = b.run(&["leadership", "select", "node-b"]);
    assert!(out.status.success(), "{out:?}");
    let t = Instant::now();
    while b.status()["role"] != "primary" {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "node-b never became primary:\n{}\n--- node-a:\n{}",
            b.log_tail(40),
            a.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.status()["divergent"].as_array().map_or(0, |d| d.len()), 0);
    // The demoted primary reads its database at once, before the new primary
    // publishes anything (issue 15, item 2).
    wait_for("node-a to step down", Duration::from_secs(10), || {
        a.status()["role"] == "secondary"
    });
    assert_eq!(cli(&adb, "SELECT count(*) FROM t").unwrap(), "21");
    let ro =
        rusqlite::Connection::open_with_flags(&adb, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    assert_eq!(rows(&ro), 21);
    drop(ro);
    // The new primary takes writes as soon as it says it is primary.
    cli(&bdb, "INSERT INTO t(v) VALUES ('b1'); CREATE TABLE v(y);").unwrap();
    let c = rusqlite::Connection::open(&bdb).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.execute("INSERT INTO t(v) VALUES ('b2')", []).unwrap();
    drop(c);
    wait_for("the old primary to follow", Duration::from_secs(30), || {
        cli(&adb, "SELECT count(*) FROM t").ok().as_deref() == Some("23")
    });
    assert_eq!(a.status()["role"], "secondary");
    let dump = |p: &Path| cli(p, ".dump").unwrap();
    assert_eq!(dump(&adb), dump(&bdb));
    assert_eq!(cli(&adb, "PRAGMA integrity_check").unwrap(), "ok");
    let st = a.status();
    assert!(
        st["last_error"].is_null() || !st["last_error"].to_string().contains("checksum"),
        "{st}"
    );
}

/// A client the kernel served on the primary (passthrough: its writes never
/// reach the daemon) keeps its connection across a hand-over, as claude-mem's
/// worker does: from then on its writes wait and fail, it still sees the new
/// primary's commits, and once it closes, the database is back on the
/// daemon's path with the usual refusals. When the lease comes back, it
/// writes again.
#[test]
fn a_client_served_by_the_kernel_is_stopped_by_a_hand_over_and_still_follows() {
    let (env, a, adb, worker) = armed_primary("walkern");
    let mode = |m: &common::mount::Mount| m.status()["io"]["databases"][DB].clone();
    let _: String = worker
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .unwrap();
    for i in 0..10 {
        worker
            .execute("INSERT INTO t(v) VALUES (?1)", [format!("a{i}")])
            .unwrap();
    }
    let b = node(&env, "node-b");
    assert!(b.run(&["pull"]).status.success());
    let bdb = b.dir.join(DB);
    assert_eq!(cli(&bdb, "SELECT count(*) FROM t").unwrap(), "10");

    let out = b.run(&["leadership", "select", "node-b"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("node-a to step down", Duration::from_secs(30), || {
        a.status()["role"] == "secondary"
    });
    assert_eq!(mode(&a), "kernel, writers locked out");
    // Nothing written on A after the hand-over reaches its file.
    let e = worker
        .execute("INSERT INTO t(v) VALUES ('late')", [])
        .unwrap_err();
    assert!(e.to_string().contains("locked"), "{e}");
    assert_eq!(rows(&worker), 10);
    wait_for("node-b to take writes", Duration::from_secs(30), || {
        b.status()["role"] == "primary"
    });
    cli(
        &bdb,
        "INSERT INTO t(v) VALUES ('b1'); INSERT INTO t(v) VALUES ('b2');",
    )
    .unwrap();
    wait_for(
        "the kernel-served client to see B's commits",
        Duration::from_secs(30),
        || rows(&worker) == 12,
    );
    drop(worker);
    wait_for(
        "the database back on the daemon's path",
        Duration::from_secs(10),
        || mode(&a) == "daemon",
    );
    let e = cli(&adb, "INSERT INTO t(v) VALUES ('nope')").unwrap_err();
    assert!(
        e.contains("disk I/O error") || e.contains("readonly"),
        "{e}"
    );
    assert_eq!(cli(&adb, "SELECT count(*) FROM t").unwrap(), "12");
    assert_eq!(a.status()["divergent"].as_array().map_or(0, |d| d.len()), 0);

    // And back: A takes writes again, its new clients served by the kernel.
    let out = a.run(&["leadership", "select", "node-a"]);
    assert!(out.status.success(), "{out:?}");
    wait_for(
        "node-a to be primary again",
        Duration::from_secs(30),
        || a.status()["role"] == "primary",
    );
    cli(&adb, "INSERT INTO t(v) VALUES ('a-again')").unwrap();
    wait_for("B to follow A again", Duration::from_secs(30), || {
        cli(&bdb, "SELECT count(*) FROM t").ok().as_deref() == Some("13")
    });
    let dump = |p: &Path| cli(p, ".dump").unwrap();
    assert_eq!(dump(&adb), dump(&bdb));
}

/// A client the kernel served stays open through a hand-over and the hand
/// back: once its node is primary again it writes, and those commits are
/// captured and reach the other node.
#[test]
fn a_client_served_by_the_kernel_writes_again_when_the_lease_comes_back() {
    let (env, a, adb, worker) = armed_primary("walback");
    let mode = |m: &common::mount::Mount| m.status()["io"]["databases"][DB].clone();
    worker
        .execute("INSERT INTO t(v) VALUES ('a1')", [])
        .unwrap();
    let b = node(&env, "node-b");
    let bdb = b.dir.join(DB);
    assert!(b.run(&["leadership", "select", "node-b"]).status.success());
    wait_for("node-a to step down", Duration::from_secs(30), || {
        a.status()["role"] == "secondary"
    });
    wait_for("node-b to take writes", Duration::from_secs(30), || {
        b.status()["role"] == "primary"
    });
    cli(&bdb, "INSERT INTO t(v) VALUES ('b1')").unwrap();
    assert!(a.run(&["pull"]).status.success());
    assert!(a.run(&["leadership", "select", "node-a"]).status.success());
    wait_for(
        "node-a to be primary again",
        Duration::from_secs(30),
        || a.status()["role"] == "primary",
    );
    assert_eq!(mode(&a), "kernel");
    assert_eq!(rows(&worker), 2);
    worker
        .execute("INSERT INTO t(v) VALUES ('a2')", [])
        .unwrap();
    wait_for(
        "node-b to see the kernel-served client's commit",
        Duration::from_secs(30),
        || cli(&bdb, "SELECT count(*) FROM t").ok().as_deref() == Some("3"),
    );
    drop(worker);
    let dump = |p: &Path| cli(p, ".dump").unwrap();
    wait_for("both files equal", Duration::from_secs(30), || {
        dump(&adb) == dump(&bdb)
    });
}

/// A primary whose WAL database the kernel serves, and a client of it opened
/// after it was armed (so the kernel serves the client too).
fn armed_primary(
    tag: &str,
) -> (
    Vec<(String, String)>,
    common::mount::Mount,
    std::path::PathBuf,
    rusqlite::Connection,
) {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket(tag), tag);
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), "6".into()));
    let a = node(&env, "node-a");
    let adb = a.dir.join(DB);
    cli(
        &adb,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);",
    )
    .unwrap();
    wait_for(
        "the kernel to serve the database",
        Duration::from_secs(10),
        || a.status()["io"]["databases"][DB] == "kernel",
    );
    let worker = rusqlite::Connection::open(&adb).unwrap();
    worker.busy_timeout(Duration::from_millis(300)).unwrap();
    (env, a, adb, worker)
}
