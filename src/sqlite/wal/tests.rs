//! WalTracker tests, most of them against real SQLite (rusqlite, bundled).

use super::*;
use crate::sqlite::checksum::PageHashes;
use crate::sqlite::testvfs::{Ev, Files, Kind, RecVfs};
use rand::{Rng, SeedableRng};
use rusqlite::{params, Connection};
use std::path::{Path, PathBuf};

const PS: u32 = 4096;

/// Opens a WAL-mode database with auto-checkpoint off, creates the schema,
/// checkpoints everything into the main file and returns its bytes: the
/// base image the WAL transactions apply to.
fn setup(c: &Connection, path: &Path) -> Vec<u8> {
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB, n INTEGER);
         PRAGMA wal_checkpoint(TRUNCATE);",
    )
    .unwrap();
    std::fs::read(path).unwrap()
}

/// Runs `n` writing transactions (inserts with overflow pages, updates,
/// deletes, multi-statement transactions, a schema change) and returns how
/// many commits it made.
fn workload(c: &Connection, rng: &mut impl Rng, n: usize) -> usize {
    for i in 0..n {
        match i % 7 {
            0 | 1 => {
                let len = rng.gen_range(10..9000);
                let v: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                c.execute("INSERT INTO t(v, n) VALUES (?1, ?2)", params![v, i as i64])
                    .unwrap();
            }
            2 => {
                c.execute(
                    "UPDATE t SET n = n + 1000 WHERE id % 3 = ?1",
                    params![(i % 3) as i64],
                )
                .unwrap();
                // Make sure the statement changed something even on an empty table.
                c.execute("INSERT INTO t(v, n) VALUES (x'00', 0)", [])
                    .unwrap();
            }
            3 => {
                c.execute_batch("BEGIN").unwrap();
                for k in 0..20 {
                    c.execute(
                        "INSERT INTO t(v, n) VALUES (randomblob(300), ?1)",
                        params![k],
                    )
                    .unwrap();
                }
                c.execute_batch("COMMIT").unwrap();
            }
            4 => {
                c.execute(
                    "DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY id LIMIT 5)",
                    [],
                )
                .unwrap();
                c.execute("INSERT INTO t(v, n) VALUES (x'01', 1)", [])
                    .unwrap();
            }
            5 if i == 5 => {
                let name = format!("u{}", rng.gen::<u32>());
                c.execute_batch(&format!(
                    "CREATE TABLE {name}(k TEXT PRIMARY KEY, w); CREATE INDEX {name}_w ON {name}(w);"
                ))
                .unwrap();
            }
            _ => {
                c.execute(
                    "INSERT INTO t(v, n) VALUES (randomblob(50), ?1)",
                    params![i as i64],
                )
                .unwrap();
            }
        }
    }
    // Count what we did: 2 commits for cases 2 and 4 and for the schema change
    // (two autocommit statements), 1 otherwise.
    (0..n)
        .map(|i| match i % 7 {
            2 | 4 => 2,
            5 if i == 5 => 2,
            _ => 1,
        })
        .sum()
}

fn apply(img: &mut Vec<u8>, txns: &[WalTxn]) {
    for t in txns {
        img.resize(t.db_size_pages as usize * t.page_size as usize, 0);
        for (p, d) in &t.pages {
            let o = (*p as usize - 1) * t.page_size as usize;
            img[o..o + d.len()].copy_from_slice(d);
        }
    }
}

/// Every row of every table, in a stable order.
fn dump(c: &Connection) -> Vec<String> {
    let mut tables: Vec<String> = c
        .prepare("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    tables.sort();
    let mut out: Vec<String> = c
        .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY name")
        .unwrap()
        .query_map([], |r| {
            Ok(format!(
                "{:?}",
                (
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?
                )
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for t in tables {
        let mut st = c
            .prepare(&format!("SELECT * FROM \"{t}\" ORDER BY 1"))
            .unwrap();
        let ncol = st.column_count();
        let rows = st
            .query_map([], |r| {
                let mut s = format!("{t}:");
                for i in 0..ncol {
                    s.push_str(&format!("{:?};", r.get::<_, rusqlite::types::Value>(i)?));
                }
                Ok(s)
            })
            .unwrap();
        out.extend(rows.map(Result::unwrap));
    }
    out
}

/// Writes `img` as a standalone database file and checks it with SQLite.
fn check_image(dir: &Path, img: &[u8], live: &Connection) {
    let p = dir.join(format!("check-{}.db", rand::random::<u32>()));
    std::fs::write(&p, img).unwrap();
    let c = Connection::open(&p).unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    assert_eq!(dump(&c), dump(live));
}

fn wal_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    s.into()
}

#[test]
fn checksum_matches_sqlite_and_host_writes_le_magic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let c = Connection::open(&path).unwrap();
    setup(&c, &path);
    c.execute("INSERT INTO t(v) VALUES (x'aa')", []).unwrap();
    let wal = std::fs::read(wal_path(&path)).unwrap();
    let h = WalHeader::parse(&wal).unwrap();
    // SQLite writes WAL_MAGIC | SQLITE_BIGENDIAN: on this little-endian host
    // that is 0x377f0682, i.e. little-endian checksum words.
    assert_eq!(cfg!(target_endian = "little"), h.magic == MAGIC_LE);
    assert!(!h.big_endian());
    assert_eq!(h.page_size, PS);
    // The header checksum validated in parse; the first frame chains from it.
    let fh = FrameHeader::parse(wal[32..56].try_into().unwrap());
    let c1 = wal_checksum(false, &wal[32..40], h.checksum);
    let c1 = wal_checksum(false, &wal[56..56 + PS as usize], c1);
    assert_eq!(c1, fh.checksum);
    // And the same bytes read big-endian do not match.
    assert_ne!(wal_checksum(true, &wal[..24], (0, 0)), h.checksum);
}

#[test]
fn header_roundtrip_and_rejects() {
    for be in [false, true] {
        let h = WalHeader::new(4096, 3, 0x1234, 0x5678, be);
        assert_eq!(WalHeader::parse(&h.encode()).unwrap(), h);
        assert_eq!(h.big_endian(), be);
    }
    let h = WalHeader::new(4096, 3, 1, 2, false);
    let mut b = h.encode();
    b[27] ^= 1;
    assert_eq!(WalHeader::parse(&b), Err(WalHeaderError::BadChecksum));
    let mut b = h.encode();
    b[0] = 0;
    assert!(matches!(
        WalHeader::parse(&b),
        Err(WalHeaderError::BadMagic(_))
    ));
    assert_eq!(
        WalHeader::parse(&b[..10]),
        Err(WalHeaderError::TooShort(10))
    );
    let mut b = WalHeader::new(4096, 3, 1, 2, false);
    b.page_size = 1000;
    assert_eq!(
        WalHeader::parse(&b.encode()),
        Err(WalHeaderError::BadPageSize(1000))
    );
    assert_eq!(h.frame_offset(1), 32);
    assert_eq!(h.frame_offset(3), 32 + 2 * 4120);
}

#[test]
fn write_may_complete_frame_geometry() {
    let fs = frame_size(PS);
    assert!(write_may_complete_frame(0, 32, PS)); // WAL header
    assert!(!write_may_complete_frame(0, 31, PS));
    assert!(write_may_complete_frame(32, 24, PS)); // frame 1 header (checksum rewrite)
    assert!(write_may_complete_frame(56, PS as u64, PS)); // frame 1 page
    assert!(!write_may_complete_frame(56, PS as u64 - 1, PS));
    assert!(!write_may_complete_frame(60, 100, PS));
    assert!(write_may_complete_frame(32 + fs, fs, PS)); // frame 2 in one write
    assert!(write_may_complete_frame(40, 10 * fs, PS)); // spans several frames
    assert!(write_may_complete_frame(32 + 3 * fs + 24, PS as u64, PS));
    assert!(!write_may_complete_frame(32 + 3 * fs + 24, 0, PS));
    // Brute force against a direct definition.
    let small = 512u32;
    let fs = frame_size(small);
    for off in 0..3 * fs {
        for len in [1u64, 7, 24, 100, 512, 536, 900] {
            let expect = (off..off + len)
                .any(|x| x == 31 || (x >= 32 && ((x - 32) % fs == 23 || (x - 32) % fs == fs - 1)));
            assert_eq!(
                write_may_complete_frame(off, len, small),
                expect,
                "{off} {len}"
            );
        }
    }
}

/// One scan of the whole WAL: one txn per commit; applying them to the
/// pre-write image gives the live database (dump and, after checkpoint,
/// byte for byte); the incremental checksum follows.
#[test]
fn real_wal_full_scan_reproduces_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let c = Connection::open(&path).unwrap();
    let base = setup(&c, &path);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let commits = workload(&c, &mut rng, 40);

    let wal = std::fs::File::open(wal_path(&path)).unwrap();
    let mut t = WalTracker::new();
    let txns = t.scan(&wal).unwrap();
    assert_eq!(txns.len(), commits);
    assert!(t.scan(&wal).unwrap().is_empty(), "nothing twice");
    assert_eq!(t.stats().txns, commits as u64);
    for w in txns.windows(2) {
        assert_eq!(w[1].first_frame, w[0].commit_frame + 1);
    }

    let mut img = base.clone();
    let mut hashes = PageHashes::from_bytes(&base, PS).unwrap();
    for txn in &txns {
        apply(&mut img, std::slice::from_ref(txn));
        let sum = hashes
            .apply(
                txn.pages.iter().map(|(p, d)| (*p, &d[..])),
                txn.db_size_pages,
            )
            .unwrap();
        assert_eq!(sum, PageHashes::from_bytes(&img, PS).unwrap().checksum());
    }
    check_image(dir.path(), &img, &c);
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    let live = std::fs::read(&path).unwrap();
    assert!(live == img, "checkpointed file equals the replayed image");
    assert_eq!(hashes, PageHashes::from_bytes(&live, PS).unwrap());
}

/// Reading the WAL at arbitrary cut points (half-written frames, with and
/// without stale bytes after the cut) yields exactly the same transactions.
#[test]
fn real_wal_incremental_cut_points() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let c = Connection::open(&path).unwrap();
    setup(&c, &path);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    workload(&c, &mut rng, 25);
    let wal = std::fs::read(wal_path(&path)).unwrap();
    let all = WalTracker::new().scan(&wal).unwrap();

    for garbage in [false, true] {
        let mut t = WalTracker::new();
        let mut got = Vec::new();
        let mut cut = 0usize;
        while cut < wal.len() {
            cut = (cut + rng.gen_range(1..3 * PS as usize)).min(wal.len());
            let mut view = wal[..cut].to_vec();
            if garbage {
                // Stale content past the cut, as after a WAL reset.
                view.extend((cut..wal.len()).map(|i| (i * 7) as u8));
            }
            got.extend(t.scan(&view).unwrap());
        }
        got.extend(t.scan(&wal).unwrap());
        assert_eq!(got, all, "garbage={garbage}");
    }
}

/// Replays a recorded sequence of SQLite writes to the WAL the way the FUSE
/// layer will: note every write, scan when asked. `split` cuts each write into
/// random pieces, as FUSE may.
fn replay_wal(
    events: &[Ev],
    files: &mut Files,
    t: &mut WalTracker,
    rng: Option<&mut rand::rngs::StdRng>,
) -> Vec<WalTxn> {
    let mut out = Vec::new();
    let mut rng = rng;
    for ev in events {
        match ev {
            Ev::Write {
                kind: Kind::Wal,
                offset,
                data,
            } => {
                let mut pieces = vec![(0usize, data.len())];
                if let Some(r) = rng.as_deref_mut() {
                    pieces.clear();
                    let mut s = 0;
                    while s < data.len() {
                        let e = (s + r.gen_range(1..=data.len())).min(data.len());
                        pieces.push((s, e));
                        s = e;
                    }
                }
                for (s, e) in pieces {
                    files.apply(&Ev::Write {
                        kind: Kind::Wal,
                        offset: offset + s as u64,
                        data: data[s..e].to_vec(),
                    });
                    if t.note_write(offset + s as u64, (e - s) as u64) {
                        out.extend(t.scan(&files.wal).unwrap());
                    }
                }
            }
            Ev::Truncate {
                kind: Kind::Wal,
                size,
            } => {
                files.apply(ev);
                t.note_truncate(*size);
                out.extend(t.scan(&files.wal).unwrap());
            }
            Ev::Delete { kind: Kind::Wal } => {
                files.apply(ev);
                t.reset_to_start();
            }
            other => files.apply(other),
        }
    }
    out
}

/// WAL resets after RESTART and TRUNCATE checkpoints, replayed write by write
/// (and with writes split at random): one txn per commit, content right, and
/// the new cycle's salt-1 is the old one plus 1 (checkpoint seq + 1).
#[test]
fn real_wal_resets_replayed_write_by_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let vfs = RecVfs::register(false);
    let c = vfs.open(&path);
    let base = setup(&c, &path);
    vfs.take();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut commits = workload(&c, &mut rng, 10);
    c.execute_batch("PRAGMA wal_checkpoint(RESTART)").unwrap();
    commits += workload(&c, &mut rng, 10);
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    commits += workload(&c, &mut rng, 10);
    c.execute_batch("PRAGMA wal_checkpoint(PASSIVE)").unwrap();
    commits += workload(&c, &mut rng, 5);
    let events = vfs.take();
    assert!(events.iter().any(|e| matches!(
        e,
        Ev::Truncate {
            kind: Kind::Wal,
            size: 0
        }
    )));

    for split in [false, true] {
        let mut files = Files::default();
        let mut t = WalTracker::new();
        let mut srng = rand::rngs::StdRng::seed_from_u64(4);
        let txns = replay_wal(&events, &mut files, &mut t, split.then_some(&mut srng));
        assert_eq!(txns.len(), commits, "split={split}");
        let mut cycles: Vec<(u32, u32, u32)> = txns
            .iter()
            .map(|t| (t.salt1, t.salt2, t.checkpoint_seq))
            .collect();
        cycles.dedup();
        // A complete PASSIVE checkpoint also makes the next writer reset the WAL.
        assert_eq!(cycles.len(), 4, "four WAL cycles");
        for w in cycles.windows(2) {
            assert_eq!(w[1].0, w[0].0.wrapping_add(1), "salt-1 incremented");
            assert_eq!(w[1].2, w[0].2 + 1, "checkpoint sequence incremented");
            assert_ne!(w[1].1, w[0].1, "salt-2 changed");
        }
        let mut img = base.clone();
        apply(&mut img, &txns);
        check_image(dir.path(), &img, &c);
    }
}

/// The reset happens between two scans, after some frames of the new cycle
/// were written: the next scan emits the new cycle's txns and nothing old.
#[test]
fn real_wal_reset_between_scans() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let c = Connection::open(&path).unwrap();
    let base = setup(&c, &path);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut t = WalTracker::new();
    let mut txns = Vec::new();
    let mut commits = 0;
    for mode in ["RESTART", "TRUNCATE", "RESTART"] {
        commits += workload(&c, &mut rng, 12);
        let wal = std::fs::File::open(wal_path(&path)).unwrap();
        txns.extend(t.scan(&wal).unwrap());
        assert_eq!(txns.len(), commits);
        c.execute_batch(&format!("PRAGMA wal_checkpoint({mode})"))
            .unwrap();
        // A few commits of the next cycle, fewer frames than the last one.
        commits += workload(&c, &mut rng, 2);
        let wal = std::fs::File::open(wal_path(&path)).unwrap();
        txns.extend(t.scan(&wal).unwrap());
        assert_eq!(txns.len(), commits, "after {mode}");
    }
    assert_eq!(t.stats().cycles, 4);
    let mut img = base;
    apply(&mut img, &txns);
    check_image(dir.path(), &img, &c);
}

/// A rolled-back transaction that spilled frames into the WAL emits nothing;
/// the next transaction overwrites those frames and is captured correctly.
/// A large transaction that spills and then rewrites pages in place (and
/// rewrites checksums at commit) is captured with its final images.
#[test]
fn real_wal_rollback_and_spill_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let vfs = RecVfs::register(false);
    let c = vfs.open(&path);
    let base = setup(&c, &path);
    c.execute_batch("PRAGMA cache_size=8;").unwrap();
    vfs.take();

    let mut files = Files::default();
    let mut t = WalTracker::new();
    let mut txns = Vec::new();

    c.execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
        .unwrap();
    // Spill then roll back.
    c.execute_batch("BEGIN").unwrap();
    for _ in 0..200 {
        c.execute("INSERT INTO t(v) VALUES (randomblob(1000))", [])
            .unwrap();
    }
    c.execute_batch("ROLLBACK").unwrap();
    let ev = vfs.take();
    let spilled = ev
        .iter()
        .filter(|e| {
            matches!(
                e,
                Ev::Write {
                    kind: Kind::Wal,
                    ..
                }
            )
        })
        .count();
    assert!(spilled > 20, "the rolled-back transaction spilled frames");
    txns.extend(replay_wal(&ev, &mut files, &mut t, None));
    assert_eq!(txns.len(), 1, "rolled back: nothing emitted");
    assert!(
        t.position() > t.committed_position(),
        "spilled frames are pending"
    );

    // The next transactions reuse the rolled-back frames.
    c.execute("INSERT INTO t(v) VALUES (x'42')", []).unwrap();
    c.execute_batch("BEGIN").unwrap();
    for i in 0..150 {
        c.execute(
            "INSERT INTO t(v, n) VALUES (randomblob(700), ?1)",
            params![i],
        )
        .unwrap();
    }
    for i in 0..150 {
        c.execute("UPDATE t SET n = n + 1 WHERE n = ?1", params![i])
            .unwrap();
    }
    c.execute_batch("COMMIT").unwrap();
    let ev = vfs.take();
    let before = t.stats().rewinds;
    txns.extend(replay_wal(&ev, &mut files, &mut t, None));
    assert_eq!(txns.len(), 3);
    assert!(
        t.stats().rewinds > before,
        "frames were overwritten in place"
    );

    let mut img = base;
    apply(&mut img, &txns);
    check_image(dir.path(), &img, &c);
}

/// A damaged frame ends the scan; once repaired, scanning resumes there.
#[test]
fn corrupted_frame_stops_scan() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let c = Connection::open(&path).unwrap();
    setup(&c, &path);
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    workload(&c, &mut rng, 12);
    let good = std::fs::read(wal_path(&path)).unwrap();
    let all = WalTracker::new().scan(&good).unwrap();
    let victim = &all[all.len() / 2];
    let h = WalHeader::parse(&good).unwrap();

    // Damage in the page, in the frame header's pgno, in a salt.
    for at in [
        h.frame_offset(victim.commit_frame) + 24 + 100,
        h.frame_offset(victim.first_frame) + 2,
        h.frame_offset(victim.first_frame) + 9,
    ] {
        let mut bad = good.clone();
        bad[at as usize] ^= 0x40;
        let mut t = WalTracker::new();
        let got = t.scan(&bad).unwrap();
        let n = all.len() / 2;
        assert_eq!(got, all[..n].to_vec(), "stops before the damaged txn");
        assert!(t.scan(&bad).unwrap().is_empty());
        assert_eq!(
            t.scan(&good).unwrap(),
            all[n..].to_vec(),
            "resumes once repaired"
        );
    }
}

/// Pins the meaning of the magic's low bit against real SQLite: a WAL rewritten
/// with magic 0x377f0683 and big-endian checksum words is recovered by SQLite
/// (and by the tracker); flipping only the magic makes SQLite ignore the WAL.
#[test]
fn big_endian_magic_recovered_by_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let c = Connection::open(&path).unwrap();
    let base = setup(&c, &path);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    workload(&c, &mut rng, 10);
    let le = std::fs::read(wal_path(&path)).unwrap();
    let txns = WalTracker::new().scan(&le).unwrap();
    let h = WalHeader::parse(&le).unwrap();

    let hb = WalHeader::new(h.page_size, h.checkpoint_seq, h.salt1, h.salt2, true);
    let mut be = hb.encode().to_vec();
    let mut chain = hb.checksum;
    let fs = h.frame_size() as usize;
    for frame in le[32..].chunks_exact(fs) {
        let fh = FrameHeader::parse(frame[..24].try_into().unwrap());
        let (bytes, c2) = encode_frame(&hb, chain, fh.pgno, fh.db_size_after_commit, &frame[24..]);
        be.extend_from_slice(&bytes);
        chain = c2;
    }
    assert_eq!(WalTracker::new().scan(&be).unwrap().len(), txns.len());

    let open_copy = |name: &str, wal: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, &base).unwrap();
        std::fs::write(wal_path(&p), wal).unwrap();
        Connection::open(&p).unwrap()
    };
    let r = open_copy("be.db", &be);
    assert_eq!(dump(&r), dump(&c), "SQLite accepts big-endian checksums");
    let mut flipped = le.clone();
    flipped[3] = 0x83;
    let r = open_copy("flipped.db", &flipped);
    let base_conn = open_copy("base.db", &[]);
    assert_eq!(dump(&r), dump(&base_conn), "wrong endianness: WAL ignored");
}

/// synchronous=FULL without powersafe overwrite: SQLite pads each commit with
/// copies of the commit frame up to a sector boundary; they are not emitted.
#[test]
fn padding_frames_not_emitted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let vfs = RecVfs::register(true);
    let c = vfs.open(&path);
    let base = setup(&c, &path);
    c.execute_batch("PRAGMA synchronous=FULL").unwrap();
    vfs.take();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let commits = workload(&c, &mut rng, 10);
    let ev = vfs.take();
    let mut t = WalTracker::new();
    let txns = replay_wal(&ev, &mut Files::default(), &mut t, None);
    assert!(t.stats().padding_frames > 0, "SQLite padded the commits");
    assert_eq!(txns.len(), commits);
    let mut img = base;
    apply(&mut img, &txns);
    check_image(dir.path(), &img, &c);
}

/// Synthetic WAL: truncation and retirement rules.
#[test]
fn truncation_rules() {
    let page = |b: u8| vec![b; 512];
    let h = WalHeader::new(512, 0, 10, 20, false);
    let mut wal = h.encode().to_vec();
    let mut chain = h.checksum;
    for (pgno, commit) in [(1, 0), (2, 2), (3, 0), (1, 3)] {
        let (f, c) = encode_frame(&h, chain, pgno, commit, &page(pgno as u8));
        wal.extend_from_slice(&f);
        chain = c;
    }
    let fs = h.frame_size() as usize;
    let mut t = WalTracker::new();
    // Two frames visible: the first txn commits.
    assert_eq!(t.scan(&wal[..32 + 2 * fs]).unwrap().len(), 1);
    // Third frame visible, then cut back to the commit: pending dropped.
    assert!(t.scan(&wal[..32 + 3 * fs]).unwrap().is_empty());
    assert_eq!(t.position(), (32 + 3 * fs) as u64);
    t.note_truncate((32 + 2 * fs) as u64);
    assert_eq!(t.position(), (32 + 2 * fs) as u64);
    let rest = t.scan(&wal).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].db_size_pages, 3);
    assert_eq!(
        rest[0].pages.keys().copied().collect::<Vec<_>>(),
        vec![1, 3]
    );
    // Truncated below committed frames with the same header: retired, nothing
    // is emitted twice even when the frames come back.
    assert!(t.scan(&wal[..32 + fs]).unwrap().is_empty());
    assert!(t.scan(&wal).unwrap().is_empty());
    // A new header starts a new cycle.
    let h2 = WalHeader::new(512, 1, 11, 99, false);
    let mut wal2 = h2.encode().to_vec();
    let (f, _) = encode_frame(&h2, h2.checksum, 1, 1, &page(9));
    wal2.extend_from_slice(&f);
    let got = t.scan(&wal2).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].pages[&1], Bytes::from(page(9)));
    // reset_to_start re-emits the file's committed transactions.
    t.reset_to_start();
    assert_eq!(t.scan(&wal2).unwrap(), got);
    // Empty and short files are no-ops.
    let mut t = WalTracker::new();
    assert!(t.scan(&Vec::new()).unwrap().is_empty());
    assert!(t.scan(&wal[..20]).unwrap().is_empty());
    assert!(t.scan(&vec![0u8; 5000]).unwrap().is_empty());
    assert!(t.header().is_none());
}

/// Pages written by a transaction beyond its final size are dropped.
#[test]
fn pages_beyond_commit_size_dropped() {
    let h = WalHeader::new(512, 0, 1, 2, true);
    let mut wal = h.encode().to_vec();
    let mut chain = h.checksum;
    for (pgno, commit) in [(5, 0), (4, 0), (1, 2)] {
        let (f, c) = encode_frame(&h, chain, pgno, commit, &[pgno as u8; 512]);
        wal.extend_from_slice(&f);
        chain = c;
    }
    let txns = WalTracker::new().scan(&wal).unwrap();
    assert_eq!(txns.len(), 1);
    assert_eq!(txns[0].pages.keys().copied().collect::<Vec<_>>(), vec![1]);
    assert_eq!((txns[0].first_frame, txns[0].commit_frame), (1, 3));
}

/// Pins: the WAL header stores a 65536-byte page size as 65536 (the database
/// header stores it as 1), and such a WAL is captured like any other.
#[test]
fn real_wal_64k_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.db");
    let c = Connection::open(&path).unwrap();
    c.execute_batch("PRAGMA page_size=65536;").unwrap();
    let base = setup(&c, &path);
    c.execute("INSERT INTO t(v) VALUES (randomblob(100000))", [])
        .unwrap();
    let wal = std::fs::read(wal_path(&path)).unwrap();
    assert_eq!(&wal[8..12], &65536u32.to_be_bytes());
    let txns = WalTracker::new().scan(&wal).unwrap();
    assert_eq!(txns.len(), 1);
    assert_eq!(txns[0].page_size, 65536);
    let mut img = base;
    apply(&mut img, &txns);
    check_image(dir.path(), &img, &c);
}

/// `scan_next` yields the same transactions as `scan`, one at a time, and
/// `undo_last` takes the last one back: the next scan yields it again, and
/// everything after it, as if it had never been read (across a WAL reset too).
#[test]
fn scan_next_and_undo_last() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let c = Connection::open(&path).unwrap();
    setup(&c, &path);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    workload(&c, &mut rng, 12);
    let wal = std::fs::File::open(wal_path(&path)).unwrap();
    let all = WalTracker::new().scan(&wal).unwrap();
    assert!(all.len() >= 12);

    let mut t = WalTracker::new();
    let mut got = Vec::new();
    let mut undone = 0;
    while let Some(txn) = t.scan_next(&wal).unwrap() {
        if got.len() % 3 == 1 && undone < got.len() {
            undone = got.len();
            let (pos, chain) = (t.committed_position(), t.stats().txns);
            t.undo_last();
            assert!(t.committed_position() < pos);
            assert_eq!(t.stats().txns, chain - 1);
            continue;
        }
        got.push(txn);
    }
    assert_eq!(got, all);
    assert_eq!(t.stats().txns, all.len() as u64);

    // A reset: the first transaction of the new cycle is taken back and read
    // again from frame 1.
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    workload(&c, &mut rng, 3);
    let first = t.scan_next(&wal).unwrap().expect("new cycle");
    assert_eq!(first.first_frame, 1);
    t.undo_last();
    assert_eq!(t.scan_next(&wal).unwrap(), Some(first));
}
