//! A primary and a secondary on one machine (separate dirs and state dirs, one
//! SeaweedFS): the secondary's readers see the primary's transactions, whole,
//! within seconds, through the same path, with no restart.

mod common;

use std::time::{Duration, Instant};

use common::mount::Mount;
use common::SeaweedFs;
use common::{node, wait_for};

const DB: &str = "claude-mem.db";

/// Rows in table `t`, if the database is readable there.
fn count(p: &std::path::Path) -> Option<i64> {
    rusqlite::Connection::open(p)
        .ok()?
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .ok()
}

/// A WAL-mode table `t` with `n` rows written through `m`'s mount.
fn seed(m: &Mount, n: usize) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(m.dir.join(DB)).unwrap();
    c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
        .unwrap();
    for i in 0..n {
        c.execute("INSERT INTO t(v) VALUES (?1)", [format!("r{i}")])
            .unwrap();
    }
    c
}

/// Everything `m` captured is in the bucket.
fn published(m: &Mount) -> Option<u64> {
    let d = &m.status()["databases"][DB];
    d["uploaded_txid"]
        .as_u64()
        .filter(|u| Some(*u) == d["head_txid"].as_u64())
}

fn consistent_count(c: &rusqlite::Connection) -> Option<i64> {
    let (count, n): (i64, i64) = c
        .query_row(
            "SELECT (SELECT count(*) FROM t), (SELECT n FROM total)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ok()?;
    assert_eq!(count, n, "the secondary showed half a transaction");
    Some(count)
}

#[test]
fn secondary_follows_the_primary_and_refuses_writes() {
    let s3 = SeaweedFs::shared();
    let env = s3.env(&s3.new_bucket("follow"), "follow");
    let a = node(&env, "node-a");
    assert_eq!(a.status()["role"], "primary");
    let pc = rusqlite::Connection::open(a.dir.join(DB)).unwrap();
    pc.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
         CREATE TABLE total(n INTEGER); INSERT INTO total VALUES (0);",
    )
    .unwrap();
    let b = node(&env, "node-b");
    assert_eq!(b.status()["role"], "secondary");
    // The secondary gets the database without any hook or restart.
    let bdb = b.dir.join(DB);
    wait_for("the secondary's copy", Duration::from_secs(15), || {
        rusqlite::Connection::open(&bdb)
            .ok()
            .and_then(|c| consistent_count(&c))
            .is_some()
    });
    // A reader opened before the writes, kept open.
    let reader = rusqlite::Connection::open(&bdb).unwrap();
    reader.busy_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(consistent_count(&reader), Some(0));
    let mut worst = Duration::ZERO;
    for i in 1..=20i64 {
        let tx = pc.unchecked_transaction().unwrap();
        for j in 0..5 {
            tx.execute("INSERT INTO t(v) VALUES (?1)", [format!("{i}-{j}")])
                .unwrap();
        }
        tx.execute("UPDATE total SET n = n + 5", []).unwrap();
        tx.commit().unwrap();
        let seen = wait_for("a commit on the secondary", Duration::from_secs(5), || {
            consistent_count(&reader) == Some(i * 5)
        });
        worst = worst.max(seen);
    }
    println!("secondary saw each of 20 commits within {worst:?}");
    assert!(worst < Duration::from_secs(3), "lag {worst:?}");
    let ok: String = reader
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    // Writes on the secondary are refused (WAL mode reports the refused
    // frame as an I/O error; docs/ARCHITECTURE.md).
    let e = reader
        .execute("INSERT INTO t(v) VALUES ('nope')", [])
        .unwrap_err();
    assert!(e.to_string().contains("disk I/O error"), "{e}");
    let st = b.status();
    assert_eq!(st["primary"], "node-a", "{st}");
    assert!(
        st["databases"][DB]["applied_txid"].as_u64().unwrap() > 0,
        "{st}"
    );
}

#[test]
fn three_candidates_started_at_once_elect_exactly_one_primary() {
    let s3 = SeaweedFs::shared();
    let env = s3.env(&s3.new_bucket("elect"), "elect");
    let nodes: Vec<Mount> = std::thread::scope(|sc| {
        let hs: Vec<_> = ["n1", "n2", "n3"]
            .iter()
            .map(|id| {
                let env = env.clone();
                sc.spawn(move || node(&env, id))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Let the losers of the create race read the winner's lease.
    wait_for("roles to settle", Duration::from_secs(20), || {
        nodes
            .iter()
            .all(|m| matches!(m.status()["role"].as_str(), Some("primary" | "secondary")))
    });
    let roles: Vec<String> = nodes
        .iter()
        .map(|m| m.status()["role"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| *r == "primary").count(),
        1,
        "{roles:?}"
    );
    let primary = nodes
        .iter()
        .find(|m| m.status()["role"] == "primary")
        .unwrap();
    assert_eq!(primary.status()["epoch"], 1);
}

#[test]
fn kill_9_of_the_primary_fails_over_with_every_published_transaction() {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("failover"), "failover");
    let ttl = 6u64;
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), ttl.to_string()));
    let a = node(&env, "node-a");
    let pc = seed(&a, 50);
    let b = node(&env, "node-b");
    let bdb = b.dir.join(DB);
    wait_for("the primary to publish", Duration::from_secs(20), || {
        published(&a).is_some()
    });
    wait_for("the secondary to catch up", Duration::from_secs(20), || {
        count(&bdb) == Some(50)
    });
    drop(pc);
    let pid = nix::unistd::Pid::from_raw(a.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let t = Instant::now();
    wait_for(
        "the secondary to take over",
        Duration::from_secs(30),
        || b.status()["role"] == "primary",
    );
    let took = t.elapsed();
    println!(
        "failover after kill -9 took {took:?} (TTL {ttl} s, renewal every {} s)",
        ttl / 3
    );
    assert!(took < Duration::from_secs(ttl + ttl / 3 + 3), "{took:?}");
    assert_eq!(b.status()["epoch"], 2);
    assert_eq!(
        count(&bdb),
        Some(50),
        "the new primary lacks published transactions"
    );
    let c = rusqlite::Connection::open(&bdb).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.execute("INSERT INTO t(v) VALUES ('after failover')", [])
        .unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    wait_for(
        "the new primary to publish",
        Duration::from_secs(20),
        || published(&b).is_some_and(|u| u > 0),
    );
    // The bucket's history continues: restore gives the new primary's state.
    let to = b.state.join("restored.db");
    let out = b.run(&["restore", "--db", DB, "--to", to.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(&to), Some(51));
}

#[test]
fn a_paused_primary_is_fenced_and_keeps_its_tail_aside() {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("fence"), "fence");
    let ttl = 6u64;
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), ttl.to_string()));
    let a = node(&env, "node-a");
    let adb = a.dir.join(DB);
    let pc = seed(&a, 20);
    let b = node(&env, "node-b");
    let bdb = b.dir.join(DB);
    wait_for("the secondary to catch up", Duration::from_secs(20), || {
        count(&bdb) == Some(20)
    });
    // A burst the uploader has not shipped yet (it batches for 200 ms), then pause.
    for i in 0..5 {
        pc.execute("INSERT INTO t(v) VALUES (?1)", [format!("tail{i}")])
            .unwrap();
    }
    let pid = nix::unistd::Pid::from_raw(a.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // Closing would wait on the paused daemon: it is closed after SIGCONT.
    wait_for(
        "the secondary to take over",
        Duration::from_secs(30),
        || b.status()["role"] == "primary",
    );
    let c = rusqlite::Connection::open(&bdb).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.execute("INSERT INTO t(v) VALUES ('b-1')", []).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    // A WAL-mode connection opened while A was primary holds SQLite's shared
    // lock; the follower applies once such connections are closed.
    drop(pc);
    let stepped = Instant::now();
    while a.status()["role"] != "secondary" {
        if stepped.elapsed() > Duration::from_secs(30) {
            let log = std::fs::read_to_string(a.status()["log_file"].as_str().unwrap()).unwrap();
            let tail: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
            panic!(
                "old primary did not step down: {}\n{}",
                a.status(),
                tail[tail.len().saturating_sub(25)..].join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = a.status();
    let reports = st["divergent"].as_array().cloned().unwrap_or_default();
    let published_by_b = b.status()["databases"][DB]["head_txid"].as_u64().unwrap();
    if let Some(r) = reports.first() {
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(r.as_str().unwrap()).unwrap()).unwrap();
        let copy = report["copy"].as_str().unwrap();
        assert_eq!(count(std::path::Path::new(copy)), Some(25), "{report}");
        println!("divergent copy: {report}");
    } else {
        // The tail made it out before the pause: then it is in B's history.
        assert!(count(&bdb).unwrap() >= 26, "{st}");
    }
    // The new primary's history is untouched: restore equals B's database.
    wait_for(
        "the new primary to publish",
        Duration::from_secs(20),
        || {
            let d = &b.status()["databases"][DB];
            d["uploaded_txid"].as_u64().is_some() && d["uploaded_txid"] == d["head_txid"]
        },
    );
    let to = b.state.join("r.db");
    let out = b.run(&["restore", "--db", DB, "--to", to.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(&to), count(&bdb));
    // The old primary now follows the new one.
    wait_for("the old primary to follow", Duration::from_secs(20), || {
        count(&adb) == count(&bdb)
    });
    assert!(published_by_b > 0);
}

#[test]
fn leadership_select_hands_over_without_losing_a_transaction() {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("select"), "select");
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), "6".into()));
    let a = node(&env, "node-a");
    let b = node(&env, "node-b");
    let (adb, bdb) = (a.dir.join(DB), b.dir.join(DB));
    let pc = seed(&a, 30);
    drop(pc);
    // pull on the primary is refused with the old tool's code 2
    let out = a.run(&["pull"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // pull on the secondary waits until it holds the head
    let out = b.run(&["pull"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(count(&bdb), Some(30));
    let out = b.run(&["leadership", "select", "node-b"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("node-b to be primary", Duration::from_secs(30), || {
        b.status()["role"] == "primary"
    });
    wait_for(
        "node-a to serve as a secondary",
        Duration::from_secs(30),
        || a.status()["role"] == "secondary",
    );
    assert_eq!(
        count(&bdb),
        Some(30),
        "a transaction was lost in the hand-over"
    );
    assert!(a.status()["divergent"]
        .as_array()
        .is_none_or(|d| d.is_empty()));
    let c = rusqlite::Connection::open(&bdb).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.execute("INSERT INTO t(v) VALUES ('b')", []).unwrap();
    drop(c);
    wait_for(
        "the old primary to see the new one's write",
        Duration::from_secs(20),
        || count(&adb) == Some(31),
    );
    // push on the old primary, now a secondary, is refused with code 3
    let out = a.run(&["push"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
}

/// The primary's head and the secondary's applied txid, once the secondary
/// holds everything the primary published.
fn converged(a: &Mount, b: &Mount) -> bool {
    published(a)
        .is_some_and(|head| b.status()["databases"][DB]["applied_txid"].as_u64() == Some(head))
}

fn integrity(c: &rusqlite::Connection) -> String {
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_reader_kept_open_sees_500_transactions_whole_within_3_s() {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    const TXNS: i64 = 500;
    const ROWS: i64 = 4;
    let s3 = SeaweedFs::shared();
    let env = s3.env(&s3.new_bucket("reader500"), "reader500");
    let a = node(&env, "node-a");
    let b = node(&env, "node-b");
    let pc = rusqlite::Connection::open(a.dir.join(DB)).unwrap();
    pc.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE t(txn INTEGER, v INTEGER);
         CREATE TABLE sums(txn INTEGER PRIMARY KEY, n INTEGER, total INTEGER);",
    )
    .unwrap();
    let bdb = b.dir.join(DB);
    wait_for(
        "the schema on the secondary",
        Duration::from_secs(20),
        || {
            rusqlite::Connection::open(&bdb)
                .and_then(|c| c.query_row("SELECT count(*) FROM sums", [], |r| r.get::<_, i64>(0)))
                .is_ok()
        },
    );
    // Opened before the primary writes, and kept open throughout.
    let mut reader = rusqlite::Connection::open(&bdb).unwrap();
    reader.busy_timeout(Duration::from_secs(10)).unwrap();
    let committed: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let writer = {
        let committed = committed.clone();
        std::thread::spawn(move || {
            let mut pc = pc;
            for k in 1..=TXNS {
                let tx = pc.transaction().unwrap();
                let mut total = 0;
                for i in 0..ROWS {
                    let v = (k * 7919 + i * 104_729) % 1_000_003;
                    total += v;
                    tx.execute("INSERT INTO t VALUES (?1, ?2)", [k, v]).unwrap();
                }
                tx.execute("INSERT INTO sums VALUES (?1, ?2, ?3)", [k, ROWS, total])
                    .unwrap();
                tx.commit().unwrap();
                committed.lock().unwrap().push(Instant::now());
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut seen = 0i64;
    let mut lags: Vec<Duration> = Vec::new();
    let mut snapshots = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen < TXNS {
        assert!(
            Instant::now() < deadline,
            "the reader saw only {seen} transactions"
        );
        // One read transaction: one snapshot of the database.
        let tx = reader.transaction().unwrap();
        let rows: BTreeMap<i64, (i64, i64)> = tx
            .prepare("SELECT txn, count(*), sum(v) FROM t GROUP BY txn")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let sums: BTreeMap<i64, (i64, i64)> = tx
            .prepare("SELECT txn, n, total FROM sums")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        tx.commit().unwrap();
        snapshots += 1;
        assert_eq!(rows, sums, "the secondary showed part of a transaction");
        let max = sums.keys().last().copied().unwrap_or(0);
        assert_eq!(
            sums.len() as i64,
            max,
            "a transaction is missing before {max}"
        );
        assert!(max >= seen, "the view went back from {seen} to {max}");
        let now = Instant::now();
        let done = committed.lock().unwrap().clone();
        for k in seen + 1..=max {
            lags.push(now.duration_since(done[k as usize - 1]));
        }
        seen = max;
        std::thread::sleep(Duration::from_millis(25));
    }
    writer.join().unwrap();
    lags.sort();
    let p50 = lags[lags.len() / 2];
    let worst = *lags.last().unwrap();
    println!(
        "{TXNS} transactions seen whole by a reader kept open: lag p50 {p50:?}, max {worst:?}, {snapshots} snapshots checked"
    );
    assert!(worst < Duration::from_secs(3), "lag {worst:?}");
}

#[test]
fn a_fresh_secondary_answers_its_first_query_on_200_mb_before_hydration_ends() {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("first-query"), "first-query");
    // The primary's first snapshot of 200 MB, then the secondary's first query.
    env.push(("MEMBRIDGE_CACHE_MB".into(), "64".into()));
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("big.db");
    let c = rusqlite::Connection::open(&src).unwrap();
    c.execute_batch(
        "PRAGMA page_size=4096; PRAGMA journal_mode=DELETE;
         CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
         WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 50000)
         INSERT INTO t SELECT x, randomblob(4000) FROM c;",
    )
    .unwrap();
    drop(c);
    let image = std::fs::read(&src).unwrap();
    assert!(image.len() > 200_000_000, "{} bytes", image.len());
    let mut a_env = env.clone();
    a_env.push(("MEMBRIDGE_NODE_ID".into(), "node-a".into()));
    let a = Mount::with_files(a_env, &[(DB, &image)]);
    drop(image);
    let t = Instant::now();
    while !(published(&a).is_some() && a.status()["databases"][DB]["last_upload"].is_string()) {
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "the 200 MB snapshot was not published: {}\n{}",
            a.status(),
            a.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "the primary published its 200 MB snapshot in {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    let b = node(&env, "node-b");
    let mounted = t.elapsed();
    let c = rusqlite::Connection::open(b.dir.join(DB))
        .unwrap_or_else(|e| panic!("opening: {e}\n{}", b.log_tail(30)));
    let len: i64 = c
        .query_row("SELECT length(v) FROM t WHERE id = 31337", [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("first query: {e}\n{}", b.log_tail(30)));
    let first = t.elapsed();
    let h = b.status()["databases"][DB]["hydration"].clone();
    println!(
        "200 MB database, fresh secondary: mounted in {mounted:?}, first query answered after {first:?}; \
         {} of {} pages local at that point",
        h["pages_local"], h["pages_total"]
    );
    assert_eq!(len, 4000);
    assert!(
        first < Duration::from_secs(2),
        "first query after {first:?}"
    );
    assert_eq!(
        h["done"], false,
        "hydration ended before the first query: {h}"
    );
    drop(c);

    let t = Instant::now();
    wait_for("hydration", Duration::from_secs(180), || {
        b.status()["databases"][DB]["hydration"]["verified"] == true
    });
    let d = &b.status()["databases"][DB];
    println!(
        "hydrated and verified in {:?} more; {} read-through fetches, {} cache hits",
        t.elapsed(),
        d["read_through_fetches"],
        d["cache_hits"]
    );
    let primary_bytes = std::fs::read(a.dir.join(DB)).unwrap();
    b.unmount();
    let local = std::fs::read(b.dir.join(DB)).unwrap();
    assert!(
        local == primary_bytes,
        "the hydrated file differs from the primary's ({} vs {} bytes)",
        local.len(),
        primary_bytes.len()
    );
}

#[test]
fn integrity_holds_on_the_secondary_through_vacuum_schema_change_truncate_and_failover() {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("integrity"), "integrity");
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), "6".into()));
    let a = node(&env, "node-a");
    let b = node(&env, "node-b");
    let pc = seed(&a, 300);
    let bdb = b.dir.join(DB);
    wait_for("the secondary", Duration::from_secs(30), || {
        count(&bdb) == Some(300)
    });
    // A reader kept open across all of it, and a fresh one each time.
    let kept = rusqlite::Connection::open(&bdb).unwrap();
    kept.busy_timeout(Duration::from_secs(10)).unwrap();
    let check = |what: &str, rows: i64| {
        wait_for(what, Duration::from_secs(30), || converged(&a, &b));
        assert_eq!(count(&bdb), Some(rows), "after {what}");
        let fresh = rusqlite::Connection::open(&bdb).unwrap();
        assert_eq!(integrity(&fresh), "ok", "fresh reader after {what}");
        assert_eq!(integrity(&kept), "ok", "kept reader after {what}");
        let n: i64 = kept
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, rows, "kept reader after {what}");
    };
    pc.execute_batch("DELETE FROM t WHERE id % 2 = 0; VACUUM;")
        .unwrap();
    check("a VACUUM", 150);
    pc.execute_batch(
        "ALTER TABLE t ADD COLUMN w TEXT; CREATE INDEX t_v ON t(v);
         UPDATE t SET w = 'x' || id; CREATE TABLE extra(k TEXT PRIMARY KEY);
         INSERT INTO extra VALUES ('a'), ('b');",
    )
    .unwrap();
    check("a schema change", 150);
    for i in 0..50 {
        pc.execute(
            "INSERT INTO t(v, w) VALUES (?1, 'y')",
            [format!("more {i}")],
        )
        .unwrap();
    }
    let (busy, _, _): (i64, i64, i64) = pc
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(busy, 0);
    check("a TRUNCATE checkpoint", 200);
    for i in 0..20 {
        pc.execute("INSERT INTO t(v) VALUES (?1)", [format!("last {i}")])
            .unwrap();
    }
    check("the last writes", 220);
    drop(pc);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the failover", Duration::from_secs(30), || {
        b.status()["role"] == "primary"
    });
    let c = rusqlite::Connection::open(&bdb).unwrap();
    assert_eq!(integrity(&c), "ok", "after the failover");
    assert_eq!(count(&bdb), Some(220));
}

#[test]
fn a_connection_open_across_promotion_keeps_working_and_then_writes() {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("promote"), "promote");
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), "6".into()));
    let a = node(&env, "node-a");
    let b = node(&env, "node-b");
    drop(seed(&a, 10));
    let bdb = b.dir.join(DB);
    wait_for("the secondary", Duration::from_secs(30), || {
        count(&bdb) == Some(10)
    });
    let c = rusqlite::Connection::open(&bdb).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 10);
    let refused = c.execute("INSERT INTO t(v) VALUES ('too early')", []);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("disk I/O error")),
        "{refused:?}"
    );
    let out = b.run(&["leadership", "select", "node-b"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("node-b to be primary", Duration::from_secs(30), || {
        b.status()["role"] == "primary"
    });
    // The same connection, as an application would retry it.
    let t = Instant::now();
    loop {
        match c.execute("INSERT INTO t(v) VALUES ('after promotion')", []) {
            Ok(_) => break,
            Err(e) if t.elapsed() < Duration::from_secs(15) => {
                let s = e.to_string();
                assert!(s.contains("disk I/O error") || s.contains("locked"), "{s}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("still refused after promotion: {e}"),
        }
    }
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 11);
    assert_eq!(integrity(&c), "ok");
    let adb = a.dir.join(DB);
    wait_for("the old primary to follow", Duration::from_secs(30), || {
        count(&adb) == Some(11)
    });
}

#[test]
fn a_wal_connection_open_across_demotion_keeps_reading_the_new_primarys_writes() {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("demote"), "demote");
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), "6".into()));
    let a = node(&env, "node-a");
    let b = node(&env, "node-b");
    // Kept open in WAL mode while node-a is primary, and after.
    let pc = seed(&a, 10);
    let (adb, bdb) = (a.dir.join(DB), b.dir.join(DB));
    wait_for("the secondary", Duration::from_secs(30), || {
        count(&bdb) == Some(10)
    });
    let out = b.run(&["leadership", "select", "node-b"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("node-b to be primary", Duration::from_secs(30), || {
        b.status()["role"] == "primary"
    });
    let c = rusqlite::Connection::open(&bdb).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.execute("INSERT INTO t(v) VALUES ('from b')", []).unwrap();
    // The view advances under the connection kept from the primary days (it
    // used to block the follower until it closed), and that very connection
    // reads the new primary's row; its own writes are refused.
    wait_for(
        "the old primary's kept connection to see node-b's row",
        Duration::from_secs(30),
        || {
            pc.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
                .ok()
                == Some(11)
        },
    );
    assert!(pc.execute("INSERT INTO t(v) VALUES ('stale')", []).is_err());
    assert_eq!(count(&adb), Some(11));
    drop(pc);
    let check = rusqlite::Connection::open(&adb).unwrap();
    assert_eq!(integrity(&check), "ok");
}

/// A segment whose pages do not produce its checksum (a writer's bug: its CRC
/// is fine, its chain looks right): the secondary stops applying, says so,
/// tries to rebuild from the verified snapshot chain (which refuses it too),
/// and keeps serving the last good state.
#[test]
fn a_segment_that_fails_its_checksum_is_refused_and_the_last_good_state_served() {
    use bytes::Bytes;
    use membridge::journal::codec::{self, SegmentMeta, Txn};
    use membridge::remote::{ObjectStore, PutMode};
    use membridge::replica::manifest::{self, hex64, parse_hex64};
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("bad-segment");
    let mut env = s3.env(&bucket, "bad-segment");
    env.push(("PRIMARY_NODE_ID".into(), "node-a".into()));
    let a = node(&env, "node-a");
    let b = node(&env, "node-b");
    drop(seed(&a, 20));
    let bdb = b.dir.join(DB);
    wait_for("the secondary", Duration::from_secs(30), || {
        converged(&a, &b)
    });
    a.unmount(); // node-a writes nothing more; the forger takes its place
    let applied = b.status()["databases"][DB]["applied_txid"]
        .as_u64()
        .unwrap();

    let cfg = s3.config(&bucket, "bad-segment");
    let layout = cfg.layout();
    let store = s3.store(&bucket);
    common::block_on(async {
        let v = manifest::load(&store, &layout, &cfg.canonical_id)
            .await
            .unwrap()
            .unwrap();
        let d = v.manifest.databases[DB].clone();
        let head = d.head_txid;
        let forged = Txn {
            txid: head + 1,
            epoch: v.manifest.epoch,
            db_size_pages: d.size_pages,
            pre_checksum: parse_hex64(&d.head_checksum).unwrap(),
            post_checksum: 0x0123_4567_89ab_cdef,
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
            pages: vec![(2, Bytes::from(vec![0x5a; d.page_size as usize]))],
        };
        let meta = SegmentMeta {
            db_name: DB.into(),
            node_id: "node-a".into(),
            page_size: d.page_size,
            created_ms: forged.timestamp_ms,
        };
        let body = codec::encode_segment(&meta, std::slice::from_ref(&forged)).unwrap();
        store
            .put(
                &layout.segment(DB, head + 1, head + 1),
                body.into(),
                PutMode::CreateOnly,
            )
            .await
            .unwrap();
        let mut next = v.manifest.clone();
        let nd = next.databases.get_mut(DB).unwrap();
        nd.head_txid = head + 1;
        nd.head_checksum = hex64(forged.post_checksum);
        manifest::swap(&store, &layout, Some(&v.etag), &next)
            .await
            .unwrap();
    });
    wait_for(
        "the refusal to be reported",
        Duration::from_secs(30),
        || {
            b.status()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("checksum"))
        },
    );
    let s = b.status();
    println!("the secondary reports: {}", s["last_error"]);
    assert_eq!(
        s["databases"][DB]["applied_txid"].as_u64(),
        Some(applied),
        "{s}"
    );
    assert_eq!(count(&bdb), Some(20), "the last good state is still served");
    let c = rusqlite::Connection::open(&bdb).unwrap();
    assert_eq!(integrity(&c), "ok");
}

/// Issue 11, item 7: a primary killed with transactions the bucket never got,
/// while another node takes over and writes, comes back. At start it writes
/// them under `divergent/` (the database at its head and a report of txids
/// and times), shows them in status.json, `membridge status` and `doctor`
/// (DEGRADED), never counts them as backlog to upload, and follows the new
/// primary. Every acknowledged commit, from either of two writers, is in the
/// new primary's history or in the report.
#[test]
fn a_restarted_primary_sets_aside_what_a_new_primary_moved_past() {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("diverge"), "diverge");
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), "3".into()));
    // Node A reaches the bucket through a gate the test can close.
    let gate = common::gate::Gate::start(s3.s3_port());
    let mut env_a = env.clone();
    for (k, v) in env_a.iter_mut() {
        if k == "MINIO_ENDPOINT" {
            *v = gate.endpoint.clone();
        }
    }
    let a = node(&env_a, "node-a");
    let adb = a.dir.join(DB);
    let pc = seed(&a, 10);
    wait_for("A to publish", Duration::from_secs(20), || {
        published(&a).is_some()
    });
    let published_a = published(&a).unwrap();
    gate.close();
    // Two writers, each on its own connection, as claude-mem's worker and a
    // hook would be.
    let pc2 = rusqlite::Connection::open(&adb).unwrap();
    pc2.busy_timeout(Duration::from_secs(5)).unwrap();
    for i in 0..5 {
        let w = if i % 2 == 0 { &pc } else { &pc2 };
        w.execute("INSERT INTO t(v) VALUES (?1)", [format!("tail{i}")])
            .unwrap();
    }
    drop((pc, pc2));
    let head_a = a.status()["databases"][DB]["head_txid"].as_u64().unwrap();
    assert_eq!(head_a, published_a + 5, "{}", a.status());
    let pid = nix::unistd::Pid::from_raw(a.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();

    let b = node(&env, "node-b");
    let bdb = b.dir.join(DB);
    wait_for("B to take over", Duration::from_secs(30), || {
        b.status()["role"] == "primary"
    });
    let c = rusqlite::Connection::open(&bdb).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.execute("INSERT INTO t(v) VALUES ('b-1')", []).unwrap();
    drop(c);
    wait_for("B to publish", Duration::from_secs(20), || {
        published(&b).is_some()
    });
    assert_eq!(count(&bdb), Some(11));

    gate.open();
    a.mount(); // clears the stale mount
    let st = a.status();
    let reports = st["divergent"].as_array().cloned().unwrap_or_default();
    assert_eq!(reports.len(), 1, "{st}");
    let path = reports[0].as_str().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(
        report["unpublished_txids"],
        serde_json::json!([published_a + 1, head_a]),
        "{report}"
    );
    assert_eq!(report["unpublished_count"], 5, "{report}");
    assert_eq!(report["bucket_epoch"], 2, "{report}");
    assert!(report["first_commit_at"].is_string() && report["last_commit_at"].is_string());
    let copy = std::path::Path::new(report["copy"].as_str().unwrap());
    assert_eq!(
        count(copy),
        Some(15),
        "the copy holds every row A acknowledged"
    );
    assert_eq!(st["databases"][DB]["backlog"], 0, "{st}");

    let out = a.run(&["status", a.dir.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("divergent: {path}")), "{text}");
    let out = a.run(&["doctor", a.dir.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains(path) && text.contains("STATUS: DEGRADED"),
        "{text}"
    );

    // A follows B; at unmount nothing promises an upload of A's tail.
    wait_for("A to follow B", Duration::from_secs(30), || {
        count(&adb) == Some(11)
    });
    let log_path = st["log_file"].as_str().unwrap().to_string();
    a.unmount();
    let log = std::fs::read_to_string(log_path).unwrap();
    assert!(!log.contains("uploaded at the next mount"), "{log}");
}
