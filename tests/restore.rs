//! `membridge restore` refuses damaged history: a corrupt segment, a truncated
//! one, and a chain with a gap are each named with the object and the reason.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use membridge::remote::{ObjectStore, PutMode, S3Store};

use common::mount::Mount;
use common::SeaweedFs;

const DB: &str = "claude-mem.db";

/// A primary that published its history in several segments, then stopped.
fn published(tag: &str) -> (Mount, S3Store, Vec<String>) {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket(tag);
    let mut env = s3.env(&bucket, tag);
    env.push(("MEMBRIDGE_NODE_ID".into(), "p1".into()));
    let m = Mount::with_files(env, &[]);
    let c = rusqlite::Connection::open(m.dir.join(DB)).unwrap();
    c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
        .unwrap();
    let store = s3.store(&bucket);
    let segments = |store: &S3Store| -> Vec<String> {
        let mut keys: Vec<String> = common::block_on(store.list("projects/"))
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .filter(|k| k.ends_with(".seg"))
            .collect();
        keys.sort();
        keys
    };
    for burst in 0..4 {
        for i in 0..5 {
            c.execute("INSERT INTO t(v) VALUES (?1)", [format!("{burst}-{i}")])
                .unwrap();
        }
        // Wait until published, so the next burst goes in a segment of its own.
        let t = Instant::now();
        loop {
            let d = &m.status()["databases"][DB];
            if d["head_txid"].as_u64().is_some() && d["head_txid"] == d["uploaded_txid"] {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "not uploaded: {d}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(c);
    m.unmount();
    let keys = segments(&store);
    assert!(keys.len() >= 4, "{keys:?}");
    (m, store, keys)
}

fn restore_err(m: &Mount) -> String {
    let to = m.state.join("restored.db");
    let out = m.run(&["restore", "--db", DB, "--to", to.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "restore should fail: {out:?}");
    assert!(!to.exists(), "a failed restore must not leave a file");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    println!("{err}");
    err
}

fn replace(store: &S3Store, key: &str, f: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    let body = common::block_on(store.get(key)).unwrap().body.to_vec();
    common::block_on(store.put(key, Bytes::from(f(body)), PutMode::Overwrite)).unwrap();
}

#[test]
fn intact_history_restores() {
    let (m, _, _) = published("rs-ok");
    let to = m.state.join("ok.db");
    let out = m.run(&["restore", "--db", DB, "--to", to.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: i64 = rusqlite::Connection::open(&to)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 20);
    // an existing file is not replaced without --force
    let out = m.run(&["restore", "--db", DB, "--to", to.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = m.run(&[
        "restore",
        "--db",
        DB,
        "--to",
        to.to_str().unwrap(),
        "--force",
    ]);
    assert!(out.status.success());
}

#[test]
fn corrupt_segment_is_rejected() {
    let (m, store, keys) = published("rs-corrupt");
    let victim = &keys[2];
    replace(&store, victim, |mut b| {
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
        b
    });
    let err = restore_err(&m);
    assert!(err.contains(victim.as_str()), "{err}");
    assert!(err.contains("checksum"), "{err}");
}

#[test]
fn truncated_segment_is_rejected() {
    let (m, store, keys) = published("rs-trunc");
    let victim = &keys[3];
    replace(&store, victim, |b| b[..b.len() * 2 / 3].to_vec());
    let err = restore_err(&m);
    assert!(err.contains(victim.as_str()), "{err}");
    assert!(err.contains("truncated") || err.contains("bytes"), "{err}");
}

#[test]
fn chain_that_does_not_follow_is_rejected() {
    let (m, store, keys) = published("rs-gap");
    let gone = &keys[2];
    common::block_on(store.delete(gone)).unwrap();
    let err = restore_err(&m);
    assert!(err.contains("txid chain gap"), "{err}");
    assert!(
        err.contains(keys[3].as_str()) && err.contains("starts at txid"),
        "{err}"
    );
}

#[test]
fn bad_target_and_unknown_database_are_one_line_errors() {
    let (m, _, _) = published("rs-args");
    let to = m.state.join("x.db");
    let out = m.run(&[
        "restore",
        "--db",
        DB,
        "--to",
        to.to_str().unwrap(),
        "--txid",
        "999999",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is after the head"));
    let out = m.run(&["restore", "--db", "nope.db", "--to", to.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no database \"nope.db\" in the manifest")
    );
    let out = m.run(&[
        "restore",
        "--db",
        DB,
        "--to",
        to.to_str().unwrap(),
        "--time",
        "yesterday",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RFC 3339"));
}
