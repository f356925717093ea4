//! Living beside the old tool (docs/MIGRATION.md): membridge nodes and
//! old-tool nodes on one bucket, the old tool played by
//! [`common::old_tool::OldTool`] (its bucket behaviour, re-implemented from
//! `sqlite_minio_sync.py`).

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use membridge::remote::{Layout, ObjectStore};

use common::mount::Mount;
use common::old_tool::{OldTool, RC_OK, RC_SECONDARY_PUSH_BLOCKED};
use common::{block_on, SeaweedFs};

const DB: &str = "claude-mem.db";
const OLD_HOLDER: &str = "an old-tool node that publishes no membridge history";

fn env(
    s3: &SeaweedFs,
    bucket: &str,
    project: &str,
    node: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut env = s3.env(bucket, project);
    env.push(("MEMBRIDGE_NODE_ID".into(), node.into()));
    for (k, v) in extra {
        env.push((k.to_string(), v.to_string()));
    }
    env
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An old-tool node's database: claude-mem's three counted tables, `rows`
/// observations, in WAL mode as claude-mem keeps it.
fn old_database(path: &Path, rows: usize) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE observations(id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT);
         CREATE TABLE session_summaries(id INTEGER PRIMARY KEY AUTOINCREMENT, summary TEXT);
         CREATE TABLE user_prompts(id INTEGER PRIMARY KEY AUTOINCREMENT, prompt TEXT);",
    )
    .unwrap();
    for i in 0..rows {
        c.execute(
            "INSERT INTO observations(text) VALUES (?1)",
            [format!("old {i}")],
        )
        .unwrap();
    }
}

fn insert(db: &Path, text: &str) -> rusqlite::Result<usize> {
    let c = rusqlite::Connection::open(db)?;
    c.busy_timeout(Duration::from_secs(5))?;
    c.execute("INSERT INTO observations(text) VALUES (?1)", [text])
}

fn count(db: &Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT COUNT(*) FROM observations", [], |r| r.get(0))
        .unwrap()
}

fn coexistence(m: &Mount) -> String {
    m.status()["coexistence"].to_string()
}

/// Issue 15, items 1 and 6: an old-tool node whose clock runs 60 s ahead
/// takes a live membridge primary's lease with a plain put of 3,600 s;
/// status and doctor name it; `select --force` takes it back by CAS, audited.
#[test]
fn an_old_tool_lease_is_named_and_taken_back_by_force() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("old-lease");
    let project = "old-lease";
    let m = Mount::with_files(
        env(
            s3,
            &bucket,
            project,
            "m1",
            &[("LEADERSHIP_LEASE_SECONDS", "6")],
        ),
        &[],
    );
    wait_for("primary", Duration::from_secs(15), || {
        m.status()["role"] == "primary"
    });
    let db = m.dir.join(DB);
    old_database(&db, 3);

    let tmp = tempfile::tempdir().unwrap();
    let mut old = OldTool::new(s3, &bucket, project, "OLD1", &tmp.path().join(DB));
    old.primary_node_id = "OLD1".into();
    old.clock_ahead_s = 60;
    let (role, lease) = old.leadership_info();
    assert_eq!(role, "primary", "{:?}", old.log);
    assert_eq!(lease["lease_seconds"], 3600);

    // membridge loses its lease at the next renewal and says why.
    wait_for("m1 to step down", Duration::from_secs(20), || {
        m.status()["role"] != "primary"
    });
    wait_for(
        "status to name the old tool",
        Duration::from_secs(15),
        || coexistence(&m).contains(OLD_HOLDER),
    );
    assert!(coexistence(&m).contains("OLD1"), "{}", coexistence(&m));
    assert!(insert(&db, "refused").is_err(), "writes are refused");
    let o = m.run(&["doctor", m.dir.to_str().unwrap()]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(4), "{out}");
    assert!(out.contains(OLD_HOLDER), "{out}");
    assert!(out.contains("leadership select m1 --force"), "{out}");

    // Without --force, select says at once that the old node cannot hand
    // over; with it the old tool's lease is replaced, at once.
    let t = Instant::now();
    let o = m.run(&["leadership", "select", "m1"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("--force"), "{}", text(&o));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let t = Instant::now();
    let o = m.run(&["leadership", "select", "m1", "--force"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    wait_for("m1 primary again", Duration::from_secs(20), || {
        m.status()["role"] == "primary"
    });
    assert!(t.elapsed() < Duration::from_secs(20));
    insert(&db, "after force").unwrap();
    let store = s3.store(&bucket);
    let l = Layout::new(&membridge::config::canonical_id(project));
    let audit = block_on(async {
        let mut found = Vec::new();
        for o in store.list(&l.audit_prefix()).await.unwrap() {
            let body = store.get(&o.key).await.unwrap().body;
            found.push(serde_json::from_slice::<serde_json::Value>(&body).unwrap());
        }
        found
    });
    let forced: Vec<_> = audit
        .iter()
        .filter(|e| e["event"] == "select-force")
        .collect();
    assert_eq!(forced.len(), 1, "{audit:?}");
    assert_eq!(forced[0]["from"], "OLD1");
    assert_eq!(forced[0]["to"], "m1");
    let o = m.run(&["leadership", "select", "m2", "--force"]);
    assert!(
        !o.status.success(),
        "a membridge primary's lease is not forced"
    );
    assert!(text(&o).contains("without --force"), "{}", text(&o));
    wait_for("the note to clear", Duration::from_secs(15), || {
        !coexistence(&m).contains(OLD_HOLDER)
    });

    // The way to keep it so (docs/MIGRATION.md): no PRIMARY_NODE_ID naming
    // the old node itself. Its push is then refused, however its clock runs.
    old.primary_node_id.clear();
    old_database(&old.db, 1);
    assert_eq!(
        old.push_sqlite(),
        RC_SECONDARY_PUSH_BLOCKED,
        "{:?}",
        old.log
    );
    assert_eq!(m.status()["role"], "primary");
}

/// Issue 15, item 6: migrate does not say "follows OLD1" of an expired
/// lease; a node migrated under a live old-tool lease is DEGRADED, and says
/// what to do.
#[test]
fn following_an_old_tool_primary_is_degraded() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("old-follow");
    let project = "old-follow";
    let tmp = tempfile::tempdir().unwrap();
    let mut old = OldTool::new(s3, &bucket, project, "OLD1", &tmp.path().join(DB));
    old_database(&old.db, 4);
    old.primary_node_id = "OLD1".into();
    old.lease_seconds = 1;
    assert_eq!(old.push_sqlite(), RC_OK, "{:?}", old.log);
    std::thread::sleep(Duration::from_millis(2100));

    let m = Mount::prepared(env(s3, &bucket, project, "m1", &[]), &[]);
    let dir = m.dir.to_str().unwrap().to_string();
    let o = m.run(&["migrate", "--dry-run", &dir]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(!out.contains("follows OLD1"), "{out}");
    assert!(out.contains("expired"), "{out}");

    // The old node runs again (a session starts): an hour's lease.
    old.lease_seconds = 3600;
    assert_eq!(old.leadership_info().0, "primary");
    let o = m.run(&["migrate", &dir]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("holds it with the old tool"), "{out}");
    m.mount();
    assert_eq!(count(&m.dir.join(DB)), 4);
    let o = m.run(&["doctor", &dir]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(4), "{out}");
    assert!(out.contains(OLD_HOLDER), "{out}");
    assert!(out.contains("STATUS: DEGRADED"), "{out}");
}

/// Issue 15, items 4 and 5: the legacy copy follows the primary within
/// MEMBRIDGE_LEGACY_REFRESH_S; an old-tool push beside membridge is noticed,
/// its snapshot kept aside (nothing lost), and the copy refreshed again.
#[test]
fn the_legacy_copy_stays_fresh_and_old_tool_overwrites_are_kept() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("old-fresh");
    let project = "old-fresh";
    let tmp = tempfile::tempdir().unwrap();
    let mut old = OldTool::new(s3, &bucket, project, "OLD1", &tmp.path().join(DB));
    old_database(&old.db, 2);
    old.leadership_enabled = false;
    assert_eq!(old.push_sqlite(), RC_OK, "{:?}", old.log);

    let m = Mount::prepared(
        env(
            s3,
            &bucket,
            project,
            "m1",
            &[("MEMBRIDGE_LEGACY_REFRESH_S", "2")],
        ),
        &[],
    );
    let dir = m.dir.to_str().unwrap().to_string();
    let o = m.run(&["migrate", &dir]);
    assert!(o.status.success(), "{}", text(&o));
    m.mount();
    wait_for("primary", Duration::from_secs(15), || {
        m.status()["role"] == "primary"
    });
    let db = m.dir.join(DB);
    for i in 0..5 {
        insert(&db, &format!("membridge {i}")).unwrap();
    }
    let t = Instant::now();
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let mut reader = OldTool::new(s3, &bucket, project, "OLD2", &other.join(DB));
    wait_for(
        "the old tool to pull every row",
        Duration::from_secs(15),
        || reader.pull_sqlite() == RC_OK && count(&reader.db) == 7,
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let st = m.status();
    assert_eq!(st["legacy"]["by_membridge"], true, "{st}");
    assert_eq!(st["legacy"]["refresh_seconds"], 2, "{st}");
    let o = m.run(&["doctor", &dir]);
    let out = text(&o);
    assert!(out.contains("legacy copy"), "{out}");
    assert_eq!(o.status.code(), Some(0), "{out}");

    // An old-tool node with ALLOW_SECONDARY_PUSH=1 pushes its own rows.
    old.leadership_enabled = true;
    old.allow_secondary_push = true;
    insert(&old.db, "only on OLD1").unwrap();
    assert_eq!(old.push_sqlite(), RC_OK, "{:?}", old.log);
    wait_for(
        "the overwrite to be noticed",
        Duration::from_secs(15),
        || coexistence(&m).contains("overwrote"),
    );
    wait_for("the copy to be listed", Duration::from_secs(15), || {
        m.status()["replaced"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    let st = m.status();
    let replaced = st["replaced"].as_array().cloned().unwrap_or_default();
    assert_eq!(replaced.len(), 1, "{st}");
    let copy = replaced[0].as_str().unwrap();
    let kept = rusqlite::Connection::open(copy).unwrap();
    let n: i64 = kept
        .query_row(
            "SELECT COUNT(*) FROM observations WHERE text = 'only on OLD1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1, "the old tool's row is kept");
    let o = m.run(&["doctor", &dir]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(4), "{out}");
    assert!(out.contains("overwrote"), "{out}");
    // ...and the old tool's nodes get membridge's copy again.
    wait_for(
        "the copy to be membridge's again",
        Duration::from_secs(15),
        || reader.pull_sqlite() == RC_OK && count(&reader.db) == 7,
    );
}

/// Issue 15, items 3 and 9: `migrate --rollback` hands the project back to
/// the old tool as it really behaves (its primary pushes, the others pull and
/// are refused a push); a bucket whose old-tool copy is then newer than
/// membridge's head is flagged by doctor and migrate.
#[test]
fn rollback_hands_the_project_back_to_the_old_tool() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("old-rollback");
    let project = "old-rollback";
    let m = Mount::with_files(env(s3, &bucket, project, "m1", &[]), &[]);
    wait_for("primary", Duration::from_secs(15), || {
        m.status()["role"] == "primary"
    });
    let db = m.dir.join(DB);
    old_database(&db, 3);
    let dir = m.dir.to_str().unwrap().to_string();

    let o = m.run(&["migrate", "--rollback", &dir]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(!m.is_mounted(), "{out}");
    for want in [
        "PRIMARY_NODE_ID=m1",
        "on m1",
        "put the old SessionStart/Stop hooks back",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }

    let tmp = tempfile::tempdir().unwrap();
    let mut other = OldTool::new(s3, &bucket, project, "OLD2", &tmp.path().join(DB));
    other.primary_node_id = "m1".into();
    assert_eq!(other.pull_sqlite(), RC_OK, "{:?}", other.log);
    assert_eq!(
        count(&other.db),
        3,
        "the old tool's copy is membridge's head"
    );
    let mut primary = OldTool::new(s3, &bucket, project, "m1", &db);
    primary.primary_node_id = "m1".into();
    insert(&db, "after rollback").unwrap();
    assert_eq!(primary.push_sqlite(), RC_OK, "{:?}", primary.log);
    assert_eq!(
        other.push_sqlite(),
        RC_SECONDARY_PUSH_BLOCKED,
        "{:?}",
        other.log
    );
    assert_eq!(other.pull_sqlite(), RC_OK, "{:?}", other.log);
    assert_eq!(count(&other.db), 4);

    // A stray membridge command on a machine afterwards sees it.
    let o = m.run(&["doctor", &dir]);
    let out = text(&o);
    assert!(out.contains("NEWER than membridge's head"), "{out}");
    assert_ne!(o.status.code(), Some(0), "{out}");
    let o = m.run(&["migrate", "--dry-run", &dir]);
    let out = text(&o);
    assert!(out.contains("newer data than membridge"), "{out}");

    // A stray mount does not take the project back from the old tool: it
    // stays read-only, and the old tool's newer copy is kept aside.
    m.mount();
    wait_for(
        "the old tool's copy kept aside",
        Duration::from_secs(20),
        || coexistence(&m).contains("overwrote"),
    );
    assert_ne!(m.status()["role"], "primary");
    assert!(insert(&db, "stray").is_err());
    assert_eq!(other.pull_sqlite(), RC_OK, "{:?}", other.log);
    assert_eq!(count(&other.db), 4, "the old tool's copy is not replaced");

    // An old pull hook left on this (read-only) machine fails before it
    // downloads a database into the mount (issue 15, item 8).
    let mut hook = OldTool::new(s3, &bucket, project, "m1-hook", &db);
    assert_eq!(
        hook.pull_sqlite(),
        common::old_tool::RC_ERROR,
        "{:?}",
        hook.log
    );
    assert!(
        hook.log.iter().any(|l| l.contains("mkstemp")),
        "{:?}",
        hook.log
    );
    let left: Vec<String> = std::fs::read_dir(&m.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tmp") || n == "backups")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Every `observations.text` of a database file (read-only).
fn texts(db: &Path) -> Vec<String> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut st = c.prepare("SELECT text FROM observations").unwrap();
    let v = st
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .collect::<rusqlite::Result<Vec<_>>>()
        .unwrap();
    v
}

/// The databases a mount set aside (`replaced/`, `divergent/`).
fn set_aside(m: &Mount, project: &str) -> Vec<std::path::PathBuf> {
    let state = m.state.join(membridge::config::canonical_id(project));
    let mut out = Vec::new();
    for sub in ["replaced", "divergent"] {
        for e in std::fs::read_dir(state.join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = e.path();
            let n = p.to_string_lossy().into_owned();
            let sidecar = [".json", ".resolved", ".check", "-wal", "-shm", ".tmp"]
                .iter()
                .any(|s| n.ends_with(s));
            if !sidecar {
                out.push(p);
            }
        }
    }
    out
}

/// Issue 15, acceptance: two membridge nodes and one old-tool node through a
/// compressed hour of sessions, each misconfiguration of the old node tried
/// once. Whenever a membridge node is read-only because of the old tool,
/// doctor says why; every row written anywhere ends in the primary's
/// database or in a copy a membridge node kept aside.
#[test]
fn a_mixed_fleet_loses_nothing_and_always_says_why() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("old-fleet");
    let project = "old-fleet";
    let extra = [
        ("LEADERSHIP_LEASE_SECONDS", "6"),
        ("MEMBRIDGE_LEGACY_REFRESH_S", "2"),
    ];
    let mut written: Vec<String> = Vec::new();
    let tmp = tempfile::tempdir().unwrap();

    // The old world: OLD1 is the old tool's primary (PRIMARY_NODE_ID=OLD1).
    let mut old = OldTool::new(s3, &bucket, project, "OLD1", &tmp.path().join(DB));
    old_database(&old.db, 3);
    written.extend((0..3).map(|i| format!("old {i}")));
    old.primary_node_id = "OLD1".into();
    assert_eq!(old.push_sqlite(), RC_OK, "{:?}", old.log);

    // m1 migrates and mounts under OLD1's hour-long lease; m2 joins.
    let m1 = Mount::prepared(env(s3, &bucket, project, "m1", &extra), &[]);
    let o = m1.run(&["migrate", m1.dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    m1.mount();
    let m2 = Mount::with_files(env(s3, &bucket, project, "m2", &extra), &[]);
    let says_why = |m: &Mount| {
        let o = m.run(&["doctor", m.dir.to_str().unwrap()]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(4), "{out}");
        assert!(out.contains(OLD_HOLDER), "{out}");
    };
    let primary = |m: &Mount| m.status()["role"] == "primary";
    let force = |m: &Mount, node: &str| {
        let o = m.run(&["leadership", "select", node, "--force"]);
        assert!(o.status.success(), "{}", text(&o));
    };
    says_why(&m1);
    says_why(&m2);
    // The fix doctor names: OLD1 stops naming itself; the lease comes back.
    old.primary_node_id = "m1".into();
    force(&m1, "m1");
    wait_for("m1 primary", Duration::from_secs(20), || primary(&m1));

    let write = |m: &Mount, written: &mut Vec<String>, tag: &str| {
        for i in 0..2 {
            let t = format!("{tag} {i}");
            // As an application would while a role change settles (a new
            // primary's view may refuse the first write for a moment).
            let start = Instant::now();
            while let Err(e) = insert(&m.dir.join(DB), &t) {
                assert!(start.elapsed() < Duration::from_secs(10), "{t}: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            written.push(t);
        }
    };
    let caught_up = |m: &Mount, n: usize| {
        wait_for("the follower to catch up", Duration::from_secs(20), || {
            texts(&m.dir.join(DB)).len() >= n
        });
    };
    for round in 0..6 {
        let (p, s) = if primary(&m2) { (&m2, &m1) } else { (&m1, &m2) };
        write(p, &mut written, &format!("round {round}"));
        caught_up(s, texts(&p.dir.join(DB)).len());
        // OLD1's session: it pulls (secondary, as configured).
        let _ = old.pull_sqlite();
        match round {
            1 => {
                // ALLOW_SECONDARY_PUSH=1: its own row over sqlite/.
                old.allow_secondary_push = true;
                insert(&old.db, "OLD1 secondary push").unwrap();
                written.push("OLD1 secondary push".into());
                assert_eq!(old.push_sqlite(), RC_OK, "{:?}", old.log);
                old.allow_secondary_push = false;
                wait_for("the copy kept", Duration::from_secs(15), || {
                    coexistence(&m1).contains("overwrote")
                });
            }
            2 => {
                // LEADERSHIP_ENABLED=0: the same, without the lease check.
                old.leadership_enabled = false;
                insert(&old.db, "OLD1 without leadership").unwrap();
                written.push("OLD1 without leadership".into());
                assert_eq!(old.push_sqlite(), RC_OK, "{:?}", old.log);
                old.leadership_enabled = true;
            }
            3 => {
                // PRIMARY_NODE_ID=OLD1 with a clock 60 s ahead: the lease.
                old.primary_node_id = "OLD1".into();
                old.clock_ahead_s = 60;
                assert_eq!(old.leadership_info().0, "primary");
                wait_for("m1 read-only", Duration::from_secs(20), || !primary(&m1));
                says_why(&m1);
                says_why(&m2);
                old.primary_node_id = "m1".into();
                force(&m1, "m1");
                wait_for("m1 primary again", Duration::from_secs(20), || primary(&m1));
            }
            4 => {
                // m1 unmounts cleanly; OLD1 (configured right) leaves the
                // released lease alone; m2 takes it and writes; m1 returns.
                m1.unmount();
                let _ = old.doctor();
                wait_for("m2 primary", Duration::from_secs(20), || primary(&m2));
                write(&m2, &mut written, "m2 while m1 was away");
                m1.mount();
                caught_up(&m1, texts(&m2.dir.join(DB)).len());
            }
            _ => {}
        }
    }
    let (head, other) = if primary(&m2) { (&m2, &m1) } else { (&m1, &m2) };
    write(head, &mut written, "last");
    caught_up(other, texts(&head.dir.join(DB)).len());
    let mut everywhere: Vec<String> = texts(&head.dir.join(DB));
    for m in [&m1, &m2] {
        for copy in set_aside(m, project) {
            everywhere.extend(texts(&copy));
        }
    }
    let lost: Vec<&String> = written.iter().filter(|t| !everywhere.contains(t)).collect();
    assert!(lost.is_empty(), "rows lost: {lost:?}");
    // The old node ends with the primary's data.
    wait_for("OLD1 to pull the head", Duration::from_secs(15), || {
        old.pull_sqlite() == RC_OK && texts(&old.db).contains(&"last 1".to_string())
    });
}
