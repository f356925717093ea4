//! Hand-over between two real mounts (issue 10). `leadership select` returns
//! once the new primary takes writes, within seconds, with nothing lost; policy
//! `follow` moves the lease to where a session starts only from an idle
//! primary (the primary decides), and two machines in use at once never pass
//! it back and forth. The measured times are in `benches/handover.rs`.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use membridge::lease::{Handover, LeaseClient};
use membridge::remote::{ObjectStore, PutMode};

use common::mount::{Mount, BIN};
use common::SeaweedFs;
use common::{node, wait_for};

const DB: &str = "claude-mem.db";

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One row written through `m`'s mount on a fresh connection (a client
/// that was open across a role change is another test's subject).
fn write(m: &Mount, v: &str) -> rusqlite::Result<()> {
    let c = rusqlite::Connection::open(m.dir.join(DB))?;
    c.busy_timeout(Duration::from_secs(2))?;
    c.execute("INSERT INTO t(v) VALUES (?1)", [v])?;
    Ok(())
}

fn count(m: &Mount) -> i64 {
    try_count(m).unwrap()
}

/// Rows in `t`, or why they cannot be read (just after a demotion).
fn try_count(m: &Mount) -> rusqlite::Result<i64> {
    let c = rusqlite::Connection::open(m.dir.join(DB))?;
    c.busy_timeout(Duration::from_secs(2))?;
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
}

fn seed(m: &Mount) {
    let c = rusqlite::Connection::open(m.dir.join(DB)).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
         INSERT INTO t(v) VALUES ('seed');",
    )
    .unwrap();
}

/// Writes one row on `m` every `every` until the flag is set.
fn busy(m: &Mount, every: Duration) -> (Arc<AtomicBool>, std::thread::JoinHandle<usize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, db) = (stop.clone(), m.dir.join(DB));
    let t = std::thread::spawn(move || {
        let mut n = 0;
        while !flag.load(Ordering::Relaxed) {
            let c = rusqlite::Connection::open(&db).unwrap();
            c.busy_timeout(Duration::from_secs(2)).unwrap();
            if c.execute("INSERT INTO t(v) VALUES ('busy')", []).is_ok() {
                n += 1;
            }
            drop(c);
            std::thread::sleep(every);
        }
        n
    });
    (stop, t)
}

#[test]
fn select_returns_once_the_new_primary_takes_writes_and_loses_nothing() {
    let s3 = SeaweedFs::shared();
    let env = s3.env(&s3.new_bucket("ho-select"), "ho-select");
    let a = node(&env, "node-a");
    seed(&a);
    let b = node(&env, "node-b");
    let mut rows = 1;
    for (to, from, id) in [(&b, &a, "node-b"), (&a, &b, "node-a")] {
        wait_for("the roles to settle", Duration::from_secs(30), || {
            from.status()["role"] == "primary" && to.status()["role"] == "secondary"
        });
        // A backlog: the last of these are not published when select starts.
        for i in 0..10 {
            write(from, &format!("before {i}")).unwrap();
            rows += 1;
        }
        let t = Instant::now();
        let out = to.run(&["leadership", "select", id]);
        let took = t.elapsed();
        assert!(out.status.success(), "{}", text(&out));
        // Done when it returns: the new primary takes a write at once.
        write(to, "right after select").unwrap_or_else(|e| {
            panic!(
                "{id} refused a write right after select returned ({took:?}): {e}\n{}\n{}",
                text(&out),
                to.log_tail(30)
            )
        });
        rows += 1;
        println!("select {id} returned after {took:?}");
        // Issue 10 asks for < 2 s; this machine may be slow and loaded.
        assert!(
            took < Duration::from_secs(5),
            "select {id} took {took:?}\n{}",
            text(&out)
        );
        assert_eq!(count(to), rows, "a transaction was lost in the hand-over");
        let t = Instant::now();
        let mut last = None;
        wait_for(
            "the old primary to follow the new one",
            Duration::from_secs(20),
            || {
                let n = try_count(from);
                let done = from.status()["role"] == "secondary" && n.as_ref().ok() == Some(&rows);
                last = Some(n);
                done
            },
        );
        println!(
            "the old primary read {rows} rows after {:?} (last {last:?})",
            t.elapsed()
        );
    }
    // Not policy follow: the hook's call does nothing and says nothing.
    let out = a.run(&["leadership", "follow", "--hook"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        text(&out)
    );
}

/// The lease as a third party reads it: (holder, epoch).
fn lease_of(c: &LeaseClient) -> (String, u64) {
    let v = common::block_on(c.read()).unwrap().unwrap();
    (v.lease.primary_node_id, v.lease.epoch)
}

fn session_start(m: &Mount) -> Output {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("mount-scripts/membridge-session-start");
    let state = m.state.as_path();
    Command::new(script)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", state.join("home"))
        .env("MEMBRIDGE_STATE_DIR", state)
        .env("MEMBRIDGE_DIR", &m.dir)
        .env("MEMBRIDGE_BIN", BIN)
        .envs(m.env.iter().cloned())
        .output()
        .unwrap()
}

#[test]
fn follow_moves_the_lease_from_an_idle_primary_only_and_never_back_and_forth() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("ho-follow");
    let mut env = s3.env(&bucket, "ho-follow");
    env.push(("LEADERSHIP_POLICY".into(), "follow".into()));
    env.push(("MEMBRIDGE_FOLLOW_IDLE_S".into(), "3".into()));
    let a = node(&env, "node-a");
    seed(&a);
    let b = node(&env, "node-b");
    let cfg = s3.config_with(
        &bucket,
        "ho-follow",
        &[
            ("MEMBRIDGE_NODE_ID", "ops"),
            ("LEADERSHIP_POLICY", "follow"),
        ],
    );
    let store = Arc::new(s3.store(&bucket));
    let ops = LeaseClient::new(&cfg.lease(), store.clone());
    let (holder, e0) = lease_of(&ops);
    assert_eq!(holder, "node-a");

    // A wrote a moment ago: a session starting on B leaves the lease with A,
    // and says so in one line on stderr.
    let out = b.run(&["leadership", "follow", "--hook"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{}", text(&out));
    assert!(stderr.contains("node-a stays primary"), "{}", text(&out));
    assert!(out.stdout.is_empty(), "{}", text(&out));

    // The primary decides: a follow request that skipped the requester's
    // look at its heartbeat is declined while it writes, and answered.
    let (stop, writer) = busy(&a, Duration::from_millis(100));
    std::thread::sleep(Duration::from_millis(500));
    let mut req = Handover::new("node-b", "node-b", e0);
    req.follow_idle_s = Some(3);
    let key = cfg.layout().handover();
    common::block_on(store.put(
        &key,
        serde_json::to_vec(&req).unwrap().into(),
        PutMode::Overwrite,
    ))
    .unwrap();
    let mut answer = None;
    wait_for("node-a to answer", Duration::from_secs(10), || {
        answer = common::block_on(ops.read_handover())
            .unwrap()
            .and_then(|h| h.refused);
        answer.is_some()
    });
    assert!(answer.as_deref().unwrap().contains("wrote"), "{answer:?}");
    stop.store(true, Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);
    assert_eq!(lease_of(&ops), ("node-a".into(), e0));
    assert_eq!(a.status()["role"], "primary");
    common::block_on(store.delete(&key)).unwrap();

    // Idle for the window: the session starting on B brings the lease over,
    // through the real SessionStart hook, and B writes at once.
    std::thread::sleep(Duration::from_millis(3500));
    let t = Instant::now();
    let out = session_start(&b);
    let took = t.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out.stdout.is_empty(),
        "a hook's stdout goes into the conversation: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the lease followed you"),
        "{}\n{}",
        text(&out),
        a.log_tail(20)
    );
    write(&b, "where the user is now").unwrap();
    println!("follow: the hook returned after {took:?}");
    let (holder, e1) = lease_of(&ops);
    assert_eq!(holder, "node-b");
    wait_for("node-a to follow", Duration::from_secs(20), || {
        a.status()["role"] == "secondary"
    });

    // No ping-pong: A's session right away is declined (B just became
    // primary)...
    let out = a.run(&["leadership", "follow", "--hook"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node-b stays primary"));
    // ...and so is every later one while B is in use.
    let (stop, writer) = busy(&b, Duration::from_millis(200));
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(1));
        let out = a.run(&["leadership", "follow", "--hook"]);
        assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    }
    stop.store(true, Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);
    assert_eq!(lease_of(&ops), ("node-b".into(), e1));
    assert_eq!(b.status()["role"], "primary");
    let rows = count(&b);
    wait_for("node-a to hold every row", Duration::from_secs(20), || {
        try_count(&a).ok() == Some(rows)
    });
}
