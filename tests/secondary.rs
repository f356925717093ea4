//! A primary and a secondary on one machine (separate dirs and state dirs, one
//! SeaweedFS): the secondary's readers see the primary's transactions, whole,
//! within seconds, through the same path, with no restart.

mod common;

use std::time::{Duration, Instant};

use common::mount::Mount;
use common::SeaweedFs;

const DB: &str = "claude-mem.db";

fn node(env: &[(String, String)], id: &str) -> Mount {
    let mut env = env.to_vec();
    env.push(("MEMBRIDGE_NODE_ID".into(), id.into()));
    Mount::with_files(env, &[])
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
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
    // Writes on the secondary fail as SQLite's readonly error.
    let e = reader
        .execute("INSERT INTO t(v) VALUES ('nope')", [])
        .unwrap_err();
    assert!(e.to_string().contains("readonly"), "{e}");
    let st = b.status();
    assert_eq!(st["primary"], "node-a", "{st}");
    assert!(
        st["databases"][DB]["applied_txid"].as_u64().unwrap() > 0,
        "{st}"
    );
}
