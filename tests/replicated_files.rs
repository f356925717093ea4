//! Replicated files between two real mounts on one SeaweedFS, with the
//! default classes: claude-mem's one-time migration markers travel from the
//! primary to the secondary (written, updated, deleted), a secondary refuses
//! to change them, and after a hand-over the new primary's version travels
//! back. Local files stay local.

mod common;

use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

use common::mount::Mount;
use common::wait_for;
use common::SeaweedFs;
use membridge::remote::Layout;
use membridge::replica::manifest;

const REMAP: &str = ".cwd-remap-applied-v1";
const CLEANUP: &str = ".cleanup-v12.4.3-applied";

fn node(env: &[(String, String)], id: &str, files: &[(&str, &[u8])]) -> Mount {
    let mut env = env.to_vec();
    env.push(("MEMBRIDGE_NODE_ID".into(), id.into()));
    Mount::with_files(env, files)
}

fn read(dir: &Path, name: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join(name)).ok()
}

/// `name` as the bucket's manifest lists it: its SHA-256, unless deleted.
fn listed(s3: &SeaweedFs, bucket: &str, project: &str, name: &str) -> Option<String> {
    let store = s3.store(bucket);
    let cid = membridge::config::canonical_id(project);
    let v = common::block_on(manifest::load(&store, &Layout::new(&cid), &cid)).ok()??;
    v.manifest
        .files
        .get(name)
        .filter(|e| !e.deleted)
        .map(|e| e.sha256.clone())
}

fn refused(res: std::io::Result<()>, what: &str) {
    match res {
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {}
        other => panic!("{what} on the secondary: {other:?}, expected a refusal"),
    }
}

#[test]
fn markers_travel_from_the_primary_are_refused_on_the_secondary_and_follow_a_hand_over() {
    let s3 = SeaweedFs::shared();
    let (project, bucket) = ("files", s3.new_bucket("files"));
    let mut env = s3.env(&bucket, project);
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), "6".into()));
    // claude-mem ran on node-a before membridge: its marker is already there.
    let cleanup: &[u8] = br#"{"appliedAt":"2026-01-02T03:04:05.678Z","backupPath":null}"#;
    let a = node(&env, "node-a", &[(CLEANUP, cleanup)]);
    assert_eq!(a.status()["role"], "primary");
    wait_for(
        "node-a to publish its marker",
        Duration::from_secs(15),
        || listed(s3, &bucket, project, CLEANUP).is_some(),
    );
    let b = node(&env, "node-b", &[]);
    assert_eq!(b.status()["role"], "secondary");
    // Ready means the first poll is done: the marker is there before any
    // client of node-b can look for it.
    assert_eq!(read(&b.dir, CLEANUP).as_deref(), Some(cleanup));

    // Written through the primary's mount as claude-mem writes it
    // (writeFileSync: open with O_TRUNC, write, close), next to a local file.
    std::fs::write(a.dir.join("worker.pid"), b"{\"pid\":1}").unwrap();
    let v1 = b"2026-02-03T04:05:06.789Z";
    std::fs::write(a.dir.join(REMAP), v1).unwrap();
    wait_for("the new marker on node-b", Duration::from_secs(10), || {
        read(&b.dir, REMAP).as_deref() == Some(v1)
    });
    assert!(!b.dir.join("worker.pid").exists(), "a local file travelled");
    let v2 = b"2026-02-03T09:09:09.999Z (rewritten)";
    std::fs::write(a.dir.join(REMAP), v2).unwrap();
    wait_for("the update on node-b", Duration::from_secs(10), || {
        read(&b.dir, REMAP).as_deref() == Some(v2)
    });

    // The secondary refuses clients' changes to replicated files, and
    // keeps accepting local ones.
    refused(std::fs::write(b.dir.join(REMAP), b"by b"), "rewriting");
    refused(std::fs::remove_file(b.dir.join(CLEANUP)), "deleting");
    std::fs::write(b.dir.join("worker.pid"), b"{\"pid\":2}").unwrap();
    assert_eq!(read(&b.dir, REMAP).as_deref(), Some(&v2[..]));

    std::fs::remove_file(a.dir.join(REMAP)).unwrap();
    wait_for("the deletion on node-b", Duration::from_secs(10), || {
        !b.dir.join(REMAP).exists()
    });
    refused(std::fs::write(b.dir.join(REMAP), b"by b"), "creating");

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
    wait_for("node-a to be secondary", Duration::from_secs(30), || {
        a.status()["role"] == "secondary"
    });
    // The new primary writes the marker as an atomic writer does (a temporary
    // file renamed onto it); the old primary gets it.
    let v3 = b"written on node-b after the hand-over";
    std::fs::write(b.dir.join("marker.tmp"), v3).unwrap();
    std::fs::rename(b.dir.join("marker.tmp"), b.dir.join(REMAP)).unwrap();
    wait_for("node-b's marker on node-a", Duration::from_secs(10), || {
        read(&a.dir, REMAP).as_deref() == Some(v3)
    });
    refused(std::fs::write(a.dir.join(REMAP), b"by a"), "rewriting");
    assert_eq!(read(&a.dir, CLEANUP).as_deref(), Some(cleanup));
    assert_eq!(read(&b.dir, CLEANUP).as_deref(), Some(cleanup));
    assert_eq!(
        read(&a.dir, "worker.pid").as_deref(),
        Some(&b"{\"pid\":1}"[..])
    );
}
