//! `membridge migrate` against a bucket left exactly as the old hook-based
//! tool's push leaves it: `sqlite/claude-mem.db` (a `VACUUM INTO` copy), its
//! `.sha256`, the old `manifest.json` (`tables` a count) and its lease.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use membridge::remote::{Layout, ObjectStore, PutMode};
use sha2::{Digest, Sha256};

use common::mount::Mount;
use common::{block_on, SeaweedFs};

const NODE: &str = "laptop";
const DB: &str = "claude-mem.db";

fn env(s3: &SeaweedFs, bucket: &str, project: &str) -> Vec<(String, String)> {
    let mut env = s3.env(bucket, project);
    env.push(("MEMBRIDGE_NODE_ID".into(), NODE.into()));
    env
}

fn layout(project: &str) -> Layout {
    Layout::new(&membridge::config::canonical_id(project))
}

/// The primary's live database (WAL mode, like claude-mem's) and the image
/// its last push uploaded: `VACUUM INTO`, as the old tool does.
fn old_databases(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let live = dir.join("live.db");
    let c = rusqlite::Connection::open(&live).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE observations(id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT, created_at TEXT);
         CREATE TABLE session_summaries(id INTEGER PRIMARY KEY AUTOINCREMENT, summary TEXT);
         CREATE TABLE user_prompts(id INTEGER PRIMARY KEY AUTOINCREMENT, prompt TEXT);
         CREATE INDEX obs_created ON observations(created_at);
         INSERT INTO observations(text, created_at) VALUES ('first', '2026-01-01'), ('second', '2026-01-02'), ('third', '2026-01-03');
         INSERT INTO session_summaries(summary) VALUES ('a session');
         INSERT INTO user_prompts(prompt) VALUES ('hello'), ('again');",
    )
    .unwrap();
    let pushed = dir.join("pushed.db");
    c.execute("VACUUM INTO ?1", [pushed.to_str().unwrap()])
        .unwrap();
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    drop(c);
    (
        std::fs::read(&live).unwrap(),
        std::fs::read(&pushed).unwrap(),
    )
}

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The three objects of the old tool's push, and its lease at `epoch`.
fn old_push(s3: &SeaweedFs, bucket: &str, project: &str, image: &[u8], epoch: u64) {
    let l = layout(project);
    let cid = membridge::config::canonical_id(project);
    let sha = sha256(image);
    let manifest = format!(
        r#"{{
  "project": "{project}",
  "canonical_id": "{cid}",
  "timestamp": "2026-02-25T10:11:12.123456+00:00",
  "source_host": "{NODE}",
  "db_size": {},
  "sha256": "{sha}",
  "observations": 3,
  "session_summaries": 1,
  "user_prompts": 2,
  "tables": 4
}}"#,
        image.len()
    );
    let now = chrono::Utc::now().timestamp();
    let lease = format!(
        r#"{{
  "canonical_id": "{cid}",
  "primary_node_id": "{NODE}",
  "issued_at": {now},
  "expires_at": {},
  "lease_seconds": 3600,
  "epoch": {epoch},
  "policy": "primary_authoritative",
  "issued_by": "{NODE}"
}}"#,
        now + 3600
    );
    let store = s3.store(bucket);
    block_on(async {
        for (key, body) in [
            (l.legacy_db(), image.to_vec()),
            (
                l.legacy_sha256(),
                format!("{sha}  claude-mem.db\n").into_bytes(),
            ),
            (l.legacy_manifest(), manifest.into_bytes()),
            (l.lease(), lease.into_bytes()),
        ] {
            store
                .put(&key, body.into(), PutMode::Overwrite)
                .await
                .unwrap();
        }
    });
}

/// key → ETag of every object of the project.
fn etags(s3: &SeaweedFs, bucket: &str, project: &str) -> BTreeMap<String, String> {
    let store = s3.store(bucket);
    block_on(store.list(layout(project).prefix()))
        .unwrap()
        .into_iter()
        .map(|o| (o.key, o.etag))
        .collect()
}

fn manifest(s3: &SeaweedFs, bucket: &str, project: &str) -> serde_json::Value {
    let got = block_on(s3.store(bucket).get(&layout(project).manifest())).unwrap();
    serde_json::from_slice(&got.body).unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn dump(path: &Path) -> String {
    let o = Command::new("sqlite3")
        .arg(path)
        .arg(".dump")
        .output()
        .expect("sqlite3 CLI");
    assert!(o.status.success(), "sqlite3 .dump: {}", text(&o));
    String::from_utf8(o.stdout).unwrap()
}

/// Every file under `dir` with its content hash (the local side of "changes nothing").
fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let body = std::fs::read(&p).unwrap_or_default();
                out.insert(p.display().to_string(), sha256(&body));
            }
        }
    }
    out
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn old_tool_bucket_is_adopted_and_mounted() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("migrate");
    let project = "migrate-project";
    let tmp = tempfile::tempdir().unwrap();
    let (live, pushed) = old_databases(tmp.path());
    old_push(s3, &bucket, project, &pushed, 3);
    let m = Mount::prepared(env(s3, &bucket, project), &[(DB, &live)]);
    let dir = m.dir.to_str().unwrap().to_string();

    // --dry-run: every step printed, nothing changed in the bucket or locally.
    let before = etags(s3, &bucket, project);
    let local_before = (tree(&m.dir), tree(&m.state));
    let o = m.run(&["migrate", "--dry-run", &dir]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for want in [
        "would back up the local claude-mem.db",
        "would upload the snapshot",
        "would create",
        "epoch 3",
        "dry run: nothing was changed",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert_eq!(etags(s3, &bucket, project), before, "{out}");
    assert_eq!((tree(&m.dir), tree(&m.state)), local_before, "{out}");

    // The adoption.
    let o = m.run(&["migrate", &dir]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("done: next, `membridge mount"), "{out}");
    let cid = membridge::config::canonical_id(project);
    let backups: Vec<_> = std::fs::read_dir(m.state.join(&cid).join("backups"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(backups.len(), 1, "{out}");
    assert_eq!(
        dump(&backups[0].path()),
        dump(&tmp.path().join("live.db")),
        "the backup holds the local database"
    );
    let man = manifest(s3, &bucket, project);
    assert_eq!(man["epoch"], 3, "{man}");
    assert_eq!(man["databases"][DB]["generation"], 1, "{man}");
    assert_eq!(man["databases"][DB]["head_txid"], 0, "{man}");
    assert_eq!(man["adopted"]["sha256"], sha256(&pushed), "{man}");
    let snap_key = man["databases"][DB]["snapshot"]["key"].clone();
    // The lease is the old tool's, untouched.
    let lease_key = layout(project).lease();
    assert_eq!(
        etags(s3, &bucket, project)[&lease_key],
        before[&lease_key],
        "the lease was not rewritten"
    );

    // Mount: the database is the old snapshot, and history continues from it.
    m.mount();
    let mounted = m.dir.join(DB);
    assert_eq!(dump(&mounted), dump(&tmp.path().join("pushed.db")));
    wait_for("primary", Duration::from_secs(15), || {
        m.status()["role"] == "primary"
    });
    let o = Command::new("sqlite3")
        .arg(&mounted)
        .arg("INSERT INTO observations(text, created_at) VALUES ('after migrate', '2026-03-01');")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    wait_for("upload", Duration::from_secs(15), || {
        m.status()["databases"][DB]["uploaded_txid"]
            .as_u64()
            .is_some_and(|t| t >= 1)
    });
    let man = manifest(s3, &bucket, project);
    assert_eq!(man["epoch"], 3, "the old lease's epoch is kept: {man}");
    assert_eq!(
        man["databases"][DB]["generation"], 1,
        "no new generation: {man}"
    );
    assert_eq!(
        man["databases"][DB]["snapshot"]["key"], snap_key,
        "no new snapshot at mount: {man}"
    );
    assert!(man["adopted"].is_object(), "{man}");
    // The old tool's copy follows within MEMBRIDGE_LEGACY_REFRESH_S.
    wait_for("legacy refresh", Duration::from_secs(70), || {
        m.status()["legacy"]["txid"]
            .as_u64()
            .is_some_and(|t| t >= 1)
    });
    m.unmount();

    // A second run (and a second dry run) finds nothing to do, changes nothing.
    let before = etags(s3, &bucket, project);
    let local_before = (tree(&m.dir), tree(&m.state.join(&cid).join("base")));
    for args in [vec!["migrate", &dir], vec!["migrate", "--dry-run", &dir]] {
        let o = m.run(&args);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        assert!(out.contains("nothing to do"), "{out}");
    }
    assert_eq!(etags(s3, &bucket, project), before);
    assert_eq!(
        (tree(&m.dir), tree(&m.state.join(&cid).join("base"))),
        local_before
    );

    // The legacy objects are still what an old-style pull reads and checks.
    let l = layout(project);
    let store = s3.store(&bucket);
    let (db, sha) = block_on(async {
        (
            store.get(&l.legacy_db()).await.unwrap().body,
            store.get(&l.legacy_sha256()).await.unwrap().body,
        )
    });
    let want = String::from_utf8_lossy(&sha)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        sha256(&db),
        want,
        "the legacy .sha256 matches the legacy db"
    );
    // Refreshed since: it holds the row written through the mount
    // (docs/MIGRATION.md: old-tool nodes pull membridge's data).
    let copy = tmp.path().join("legacy-now.db");
    std::fs::write(&copy, &db).unwrap();
    assert!(
        dump(&copy).contains("after migrate"),
        "the legacy copy was refreshed after the mount's write"
    );
}

#[test]
fn a_fresh_machine_without_a_local_database_gets_the_bucket_copy() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("migrate-fresh");
    let project = "migrate-fresh";
    let tmp = tempfile::tempdir().unwrap();
    let (_, pushed) = old_databases(tmp.path());
    old_push(s3, &bucket, project, &pushed, 3);
    let m = Mount::prepared(env(s3, &bucket, project), &[]);
    let o = m.run(&["migrate", m.dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(m.dir.join(DB)).unwrap(), pushed);
}

#[test]
fn errors_are_one_clear_line_and_change_nothing() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("migrate-errors");
    let project = "migrate-errors";
    let tmp = tempfile::tempdir().unwrap();
    let (live, pushed) = old_databases(tmp.path());
    let m = Mount::prepared(env(s3, &bucket, project), &[(DB, &live)]);
    let dir = m.dir.to_str().unwrap();
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).trim().to_string();

    // Nothing to adopt.
    let o = m.run(&["migrate", dir]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = stderr(&o);
    assert!(err.contains("no legacy snapshot to adopt"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A digest that does not match the object.
    old_push(s3, &bucket, project, &pushed, 3);
    let store = s3.store(&bucket);
    let l = layout(project);
    block_on(store.put(
        &l.legacy_sha256(),
        format!("{}  claude-mem.db\n", "0".repeat(64)).into(),
        PutMode::Overwrite,
    ))
    .unwrap();
    let before = etags(s3, &bucket, project);
    let o = m.run(&["migrate", dir]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = stderr(&o);
    assert!(err.contains("sha256 mismatch"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(etags(s3, &bucket, project), before);
    assert_eq!(std::fs::read(m.dir.join(DB)).unwrap(), live);

    // The old tool's manifest with a field of the wrong type: refused, naming
    // the object and the field.
    old_push(s3, &bucket, project, &pushed, 3);
    block_on(store.put(
        &l.legacy_manifest(),
        br#"{"canonical_id": "x", "sha256": 5}"#.to_vec().into(),
        PutMode::Overwrite,
    ))
    .unwrap();
    let before = etags(s3, &bucket, project);
    let o = m.run(&["migrate", dir]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = stderr(&o);
    assert!(
        err.contains("sqlite/manifest.json") && err.contains("field `sha256` is a number"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(etags(s3, &bucket, project), before);

    // A local database with other content is not replaced silently.
    old_push(s3, &bucket, project, &pushed, 3);
    let c = rusqlite::Connection::open(m.dir.join(DB)).unwrap();
    c.execute("INSERT INTO observations(text) VALUES ('only here')", [])
        .unwrap();
    drop(c);
    let o = m.run(&["migrate", dir]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = stderr(&o);
    assert!(
        err.contains("differs from the bucket's legacy snapshot")
            && err.contains("local: 4 observations")
            && err.contains("--replace-local"),
        "{err}"
    );
    assert!(block_on(store.head(&l.manifest())).is_err(), "no manifest");

    // A manifest membridge wrote itself is not adopted over.
    let o = m.run(&["migrate", "--replace-local", dir]);
    assert!(o.status.success(), "{}", text(&o));
    let key = l.manifest();
    let mut man = manifest(s3, &bucket, project);
    man.as_object_mut().unwrap().remove("adopted");
    block_on(store.put(
        &key,
        serde_json::to_vec(&man).unwrap().into(),
        PutMode::Overwrite,
    ))
    .unwrap();
    let other = Mount::prepared(env(s3, &bucket, project), &[]);
    let o = other.run(&["migrate", other.dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        stderr(&o).contains("already holds a membridge manifest with different content"),
        "{}",
        text(&o)
    );
}
