use super::*;

fn snap_meta(ps: u32, pages: u32, sum: u64) -> SnapshotMeta {
    SnapshotMeta {
        db_name: "claude-mem.db".into(),
        node_id: "node-b".into(),
        txid: 4242,
        epoch: 7,
        page_size: ps,
        page_count: pages,
        db_checksum: sum,
        timestamp_ms: 1_700_000_000_999,
    }
}

fn random_image(rng: &mut StdRng, ps: u32, pages: u32) -> Vec<u8> {
    let mut img = vec![0u8; (ps * pages) as usize];
    for (k, b) in img.iter_mut().enumerate() {
        *b = if k % 97 < 5 {
            rng.gen()
        } else {
            (k / 4096) as u8
        };
    }
    img
}

fn snapshot_of(rng: &mut StdRng, ps: u32, pages: u32) -> (Vec<u8>, Vec<u8>) {
    let img = random_image(rng, ps, pages);
    let sum = PageHashes::from_bytes(&img, ps).unwrap().checksum();
    let bytes = encode_snapshot(snap_meta(ps, pages, sum), &img).unwrap();
    (img, bytes)
}

#[test]
fn snapshot_roundtrip_and_range_reads() {
    let mut rng = StdRng::seed_from_u64(9);
    for (ps, pages) in [
        (4096, 0),
        (4096, 1),
        (4096, 16),
        (4096, 17),
        (512, 300),
        (65536, 3),
        (1024, 64),
    ] {
        let (img, bytes) = snapshot_of(&mut rng, ps, pages);
        let (h, back) = decode_snapshot(&bytes).unwrap();
        assert_eq!(back, img, "{ps} {pages}");
        assert_eq!(
            (h.txid, h.epoch, h.page_count, h.page_size),
            (4242, 7, pages, ps)
        );
        assert_eq!(h.pages_per_frame, default_pages_per_frame(ps));
        assert_eq!(
            h.db_checksum,
            PageHashes::from_bytes(&img, ps).unwrap().checksum()
        );

        // Range-read path: header from a prefix, index from a computed suffix.
        let prefix = &bytes[..SNAPSHOT_MAX_HEADER_LEN.min(bytes.len())];
        let hdr = SnapshotReader::parse_header(prefix).unwrap();
        assert_eq!(hdr, h);
        let range = hdr.index_range(bytes.len() as u64);
        assert_eq!(range.end - range.start, hdr.index_suffix_len());
        let r = SnapshotReader::new(hdr, &bytes[range.start as usize..]).unwrap();
        assert_eq!(r.object_len(), bytes.len() as u64);
        for pgno in 1..=pages {
            let (off, len) = r.page_range(pgno).unwrap();
            let frame = &bytes[off as usize..off as usize + len as usize];
            let page = r.decode_page(frame, pgno).unwrap();
            let o = ((pgno - 1) * ps) as usize;
            assert_eq!(&page[..], &img[o..o + ps as usize], "page {pgno}");
        }
        assert!(matches!(
            r.page_range(0),
            Err(CodecError::PageOutOfRange { .. })
        ));
        assert!(matches!(
            r.page_range(pages + 1),
            Err(CodecError::PageOutOfRange { .. })
        ));
    }
}

#[test]
fn snapshot_writer_checks() {
    let mut rng = StdRng::seed_from_u64(10);
    let img = random_image(&mut rng, 512, 10);
    let sum = PageHashes::from_bytes(&img, 512).unwrap().checksum();
    // Wrong declared checksum: the source changed while it was read.
    let e = encode_snapshot(snap_meta(512, 10, sum ^ 1), &img).unwrap_err();
    assert!(matches!(e, CodecError::DbChecksum { .. }), "{e}");
    // Too few / too many pages.
    let e = encode_snapshot(snap_meta(512, 11, sum), &img).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::PageCountMismatch {
                declared: 11,
                written: 10
            }
        ),
        "{e}"
    );
    let e = encode_snapshot(snap_meta(512, 9, sum), &img).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::PageCountMismatch {
                declared: 9,
                written: 10
            }
        ),
        "{e}"
    );
    let mut w = SnapshotWriter::new(Vec::new(), snap_meta(512, 1, 0)).unwrap();
    assert!(matches!(
        w.write_page(&[0u8; 100]),
        Err(CodecError::PageLength { .. })
    ));
    assert!(matches!(
        SnapshotWriter::new(Vec::new(), snap_meta(3000, 1, 0)),
        Err(CodecError::BadPageSize(3000))
    ));
}

/// Flip every byte of a snapshot: the error names the region hit.
#[test]
fn snapshot_every_byte_flip_is_rejected_precisely() {
    // 3 frames of 128 pages; mostly constant pages keep the object (and the
    // number of flips to try) small.
    let img: Vec<u8> = (0..300 * 512)
        .map(|k| if k % 512 == 7 { (k / 512) as u8 } else { 0 })
        .collect();
    let sum = PageHashes::from_bytes(&img, 512).unwrap().checksum();
    let bytes = encode_snapshot(snap_meta(512, 300, sum), &img).unwrap();
    let r = SnapshotReader::from_bytes(&bytes).unwrap();
    let hl = r.header().header_len as usize;
    let frames = r.index().to_vec();
    assert_eq!(frames.len(), 3);
    let index_start = frames.last().map(|e| e.offset + u64::from(e.len)).unwrap() as usize;
    let footer = bytes.len() - SNAPSHOT_FOOTER_LEN;
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x04;
        let err = decode_snapshot(&b).expect_err("flip must be detected");
        let ok = match i {
            0..=7 => matches!(err, CodecError::BadMagic { .. }),
            8..=9 => matches!(err, CodecError::UnsupportedVersion { .. }),
            _ if i < hl => matches!(
                err,
                CodecError::Checksum {
                    region: Region::Header,
                    ..
                } | CodecError::BadHeader(_)
            ),
            _ if i < index_start => {
                let k = frames
                    .iter()
                    .position(|e| (i as u64) < e.offset + u64::from(e.len))
                    .unwrap();
                matches!(err, CodecError::Checksum { region: Region::Frame(f), .. } if f as usize == k)
            }
            _ if i < footer => matches!(
                err,
                CodecError::Checksum {
                    region: Region::Index,
                    ..
                }
            ),
            _ if i < footer + 8 => matches!(err, CodecError::BadIndex(_)),
            _ if i < footer + 12 => matches!(
                err,
                CodecError::Checksum {
                    region: Region::Index,
                    ..
                }
            ),
            _ if i < footer + 20 => matches!(err, CodecError::BadMagic { .. }),
            _ => matches!(
                err,
                CodecError::Checksum {
                    region: Region::File,
                    ..
                }
            ),
        };
        assert!(ok, "byte {i}: {err}");
    }
}

#[test]
fn snapshot_truncation_and_bad_frames() {
    let mut rng = StdRng::seed_from_u64(12);
    let (_, bytes) = snapshot_of(&mut rng, 1024, 70);
    for n in 0..bytes.len() {
        assert!(decode_snapshot(&bytes[..n]).is_err(), "prefix {n}");
        // The tail alone never parses as a valid index for a cut object.
        let _ = SnapshotReader::from_bytes(&bytes[..n]);
    }
    let r = SnapshotReader::from_bytes(&bytes).unwrap();
    let (off, len) = r.page_range(1).unwrap();
    let frame = &bytes[off as usize..(off + u64::from(len)) as usize];
    assert!(matches!(
        r.decode_page(&frame[1..], 1),
        Err(CodecError::FrameLength { frame: 0, .. })
    ));
    // Frame 0's bytes handed in for a page of frame 1.
    let e = r.decode_page(frame, 65).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::FrameLength { frame: 1, .. }
                | CodecError::Checksum {
                    region: Region::Frame(1),
                    ..
                }
        ),
        "{e}"
    );
    let short = SnapshotReader::parse_header(&bytes[..20]).unwrap_err();
    assert!(matches!(short, CodecError::Truncated { .. }), "{short}");
    let h = SnapshotReader::parse_header(&bytes).unwrap();
    let e = SnapshotReader::new(h, &bytes[bytes.len() - 10..]).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::Truncated {
                what: "snapshot index",
                ..
            }
        ),
        "{e}"
    );
    let e = decode_snapshot(b"MBSEG001xxxxxxxx").unwrap_err();
    assert!(matches!(e, CodecError::BadMagic { .. }), "{e}");
    let e = decode_segment(&bytes).unwrap_err();
    assert!(matches!(e, CodecError::BadMagic { .. }), "{e}");
}

#[test]
fn snapshot_randomized() {
    let mut rng = StdRng::seed_from_u64(13);
    for _ in 0..25 {
        let ps = 1u32 << rng.gen_range(9..=12);
        let pages = rng.gen_range(0..80);
        let (img, bytes) = snapshot_of(&mut rng, ps, pages);
        assert_eq!(decode_snapshot(&bytes).unwrap().1, img);
        for _ in 0..10 {
            let mut b = bytes.clone();
            let i = rng.gen_range(0..b.len());
            b[i] ^= 1 << rng.gen_range(0..8);
            assert!(decode_snapshot(&b).is_err());
        }
    }
}

/// A real SQLite database survives snapshot → restore, checksum included.
#[test]
fn snapshot_of_real_sqlite_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("real.db");
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 500)
         INSERT INTO t(v) SELECT randomblob(200 + i) FROM n;",
    )
    .unwrap();
    drop(c);
    let hashes = PageHashes::from_file(&path, 4096).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    let mut w = SnapshotWriter::new(
        Vec::new(),
        snap_meta(4096, hashes.page_count(), hashes.checksum()),
    )
    .unwrap();
    let mut buf = vec![0u8; 4096];
    for p in 0..u64::from(hashes.page_count()) {
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, p * 4096).unwrap();
        w.write_page(&buf).unwrap();
    }
    let bytes = w.finish().unwrap();
    let out = dir.path().join("restored.db");
    let file = std::fs::File::create(&out).unwrap();
    SnapshotReader::restore_to(&bytes, std::io::BufWriter::new(file)).unwrap();
    let r = rusqlite::Connection::open(&out).unwrap();
    let ok: String = r
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let n: i64 = r
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 500);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&path).unwrap());
}
