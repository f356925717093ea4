use super::*;
use crate::sqlite::checksum::PageHashes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn meta(page_size: u32) -> SegmentMeta {
    SegmentMeta {
        db_name: "claude-mem.db".into(),
        node_id: "node-a".into(),
        page_size,
        created_ms: 1_700_000_000_123,
    }
}

/// A chain of `n` random transactions starting at `txid`, with checksums
/// that really are the whole-database checksums of the evolving image.
fn random_txns(rng: &mut StdRng, page_size: u32, txid: u64, n: usize) -> Vec<Txn> {
    let mut hashes = PageHashes::new(page_size).unwrap();
    let mut size = 0u32;
    let mut epoch = 3;
    (0..n)
        .map(|i| {
            let pre = hashes.checksum();
            size = match rng.gen_range(0..6) {
                0 if size > 1 => rng.gen_range(1..size),
                1 | 2 => size + rng.gen_range(1..5),
                _ => size.max(1),
            };
            let mut pgnos: Vec<u32> = (0..rng.gen_range(1..6))
                .map(|_| rng.gen_range(1..=size))
                .collect();
            pgnos.sort_unstable();
            pgnos.dedup();
            let pages: Vec<(u32, Bytes)> = pgnos
                .into_iter()
                .map(|p| {
                    let mut d = vec![0u8; page_size as usize];
                    // Compressible but not constant.
                    let fill: u8 = rng.gen();
                    for (k, b) in d.iter_mut().enumerate() {
                        *b = if k % 64 < 8 { rng.gen() } else { fill };
                    }
                    (p, Bytes::from(d))
                })
                .collect();
            let post = hashes
                .apply(pages.iter().map(|(p, d)| (*p, &d[..])), size)
                .unwrap();
            if rng.gen_range(0..10) == 0 {
                epoch += 1;
            }
            Txn {
                txid: txid + i as u64,
                epoch,
                db_size_pages: size,
                pre_checksum: pre,
                post_checksum: post,
                timestamp_ms: 1_700_000_000_000 + i as i64,
                pages,
            }
        })
        .collect()
}

/// Rewrites header fields of an encoded segment and fixes both CRCs, to build
/// objects that pass the checksums but lie.
fn patch_segment(bytes: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = bytes.to_vec();
    f(&mut b);
    let hl = be16(&b, 10) as usize;
    let crc = crc32fast::hash(&b[..hl - 4]);
    b[hl - 4..hl].copy_from_slice(&crc.to_be_bytes());
    let end = b.len() - 4;
    let crc = crc32fast::hash(&b[..end]);
    b[end..].copy_from_slice(&crc.to_be_bytes());
    b
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn segment_roundtrip() {
    let mut rng = StdRng::seed_from_u64(1);
    for ps in [512, 4096, 65536] {
        let txns = random_txns(&mut rng, ps, 1000, 12);
        let bytes = encode_segment(&meta(ps), &txns).unwrap();
        let seg = decode_segment(&bytes).unwrap();
        assert_eq!(seg.txns, txns);
        let h = &seg.header;
        assert_eq!((h.txid_from, h.txid_to, h.txn_count), (1000, 1011, 12));
        assert_eq!(h.pre_checksum, txns[0].pre_checksum);
        assert_eq!(h.post_checksum, txns[11].post_checksum);
        assert_eq!(h.epoch, txns[11].epoch);
        assert_eq!(h.page_size, ps);
        assert_eq!(
            (h.db_name.as_str(), h.node_id.as_str()),
            ("claude-mem.db", "node-a")
        );
        assert_eq!(h.created_ms, 1_700_000_000_123);
        assert_eq!(h.object_len(), bytes.len() as u64);
        assert_eq!(
            parse_segment_header(&bytes[..SEGMENT_MAX_HEADER_LEN.min(bytes.len())]).unwrap(),
            *h
        );
        let raw: usize = txns.iter().map(|t| t.pages.len() * ps as usize).sum();
        assert!(bytes.len() < raw, "compressed");
    }
}

#[test]
fn segment_reader_streams_and_stops_early() {
    let mut rng = StdRng::seed_from_u64(2);
    let txns = random_txns(&mut rng, 4096, 1, 20);
    let bytes = encode_segment(&meta(4096), &txns).unwrap();
    let mut r = SegmentReader::new(&bytes).unwrap();
    assert_eq!(r.header().txn_count, 20);
    let first: Vec<Txn> = r.by_ref().take(5).map(Result::unwrap).collect();
    assert_eq!(first, txns[..5]);
    // finish() drains and checks the rest.
    assert_eq!(r.finish().unwrap().txid_to, 20);
}

#[test]
fn segment_chain_checks() {
    let mut rng = StdRng::seed_from_u64(3);
    let txns = random_txns(&mut rng, 512, 1, 10);
    let a = decode_segment(&encode_segment(&meta(512), &txns[..4]).unwrap())
        .unwrap()
        .header;
    let b = decode_segment(&encode_segment(&meta(512), &txns[4..]).unwrap())
        .unwrap()
        .header;
    b.check_follows(a.txid_to, a.post_checksum).unwrap();
    assert!(matches!(
        b.check_follows(a.txid_to + 1, a.post_checksum),
        Err(CodecError::ChainGap {
            expected: 6,
            found: 5
        })
    ));
    assert!(matches!(
        b.check_follows(a.txid_to, a.post_checksum ^ 1),
        Err(CodecError::ChecksumChain { txid: 5, .. })
    ));
}

#[test]
fn encoder_rejects_invalid_input() {
    let mut rng = StdRng::seed_from_u64(4);
    let good = random_txns(&mut rng, 512, 1, 3);
    let enc = |txns: &[Txn]| encode_segment(&meta(512), txns);
    assert!(matches!(enc(&[]), Err(CodecError::EmptySegment)));
    let mut t = good.clone();
    t[1].txid = 7;
    assert!(matches!(
        enc(&t),
        Err(CodecError::TxidNotConsecutive {
            index: 1,
            expected: 2,
            found: 7
        })
    ));
    let mut t = good.clone();
    t[2].pre_checksum ^= 1;
    assert!(matches!(
        enc(&t),
        Err(CodecError::ChecksumChain { txid: 3, .. })
    ));
    let mut t = good.clone();
    t[0].epoch = 99;
    assert!(matches!(
        enc(&t),
        Err(CodecError::EpochRegressed { txid: 2, .. })
    ));
    let mut t = good.clone();
    t[0].pages.insert(0, (0, Bytes::from(vec![0u8; 512])));
    assert!(matches!(enc(&t), Err(CodecError::PageZero { txid: 1 })));
    let mut t = good.clone();
    t[0].pages = vec![(1, Bytes::from(vec![0u8; 100]))];
    assert!(matches!(
        enc(&t),
        Err(CodecError::PageLength {
            txid: 1,
            pgno: 1,
            len: 100,
            page_size: 512
        })
    ));
    let mut t = good.clone();
    t[0].db_size_pages = 3;
    t[0].pages = vec![
        (2, Bytes::from(vec![0u8; 512])),
        (2, Bytes::from(vec![0u8; 512])),
    ];
    assert!(matches!(
        enc(&t),
        Err(CodecError::PagesNotAscending {
            txid: 1,
            pgno: 2,
            prev: 2
        })
    ));
    let mut t = good.clone();
    t[0].pages = vec![(t[0].db_size_pages + 1, Bytes::from(vec![0u8; 512]))];
    assert!(matches!(
        enc(&t),
        Err(CodecError::PageBeyondDbSize { txid: 1, .. })
    ));
    let mut m = meta(512);
    m.page_size = 1000;
    assert!(matches!(
        encode_segment(&m, &good),
        Err(CodecError::BadPageSize(1000))
    ));
    let mut m = meta(512);
    m.db_name = String::new();
    assert!(matches!(
        encode_segment(&m, &good),
        Err(CodecError::BadName { .. })
    ));
    m.db_name = "x".repeat(256);
    assert!(matches!(
        encode_segment(&m, &good),
        Err(CodecError::BadName { .. })
    ));
}

/// Flip every byte of a segment: each flip is rejected, with the error of the
/// region it hit.
#[test]
fn segment_every_byte_flip_is_rejected_precisely() {
    let mut rng = StdRng::seed_from_u64(5);
    let txns = random_txns(&mut rng, 512, 40, 4);
    let bytes = encode_segment(&meta(512), &txns).unwrap();
    let hl = be16(&bytes, 10) as usize;
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x10;
        let err = decode_segment(&b).expect_err("flip must be detected");
        match i {
            0..=7 => assert!(matches!(err, CodecError::BadMagic { .. }), "{i}: {err}"),
            8..=9 => assert!(
                matches!(err, CodecError::UnsupportedVersion { .. }),
                "{i}: {err}"
            ),
            10..=11 => assert!(
                matches!(
                    err,
                    CodecError::BadHeader(_)
                        | CodecError::Checksum {
                            region: Region::Header,
                            ..
                        }
                ),
                "{i}: {err}"
            ),
            _ if i < hl => assert!(
                matches!(
                    err,
                    CodecError::Checksum {
                        region: Region::Header,
                        ..
                    }
                ),
                "{i}: {err}"
            ),
            _ => assert!(
                matches!(
                    err,
                    CodecError::Checksum {
                        region: Region::File,
                        ..
                    }
                ),
                "{i}: {err}"
            ),
        }
    }
}

#[test]
fn segment_truncation_and_extension() {
    let mut rng = StdRng::seed_from_u64(6);
    let txns = random_txns(&mut rng, 512, 1, 3);
    let bytes = encode_segment(&meta(512), &txns).unwrap();
    let hl = be16(&bytes, 10) as usize;
    for n in 0..bytes.len() {
        let err = decode_segment(&bytes[..n]).expect_err("truncated");
        if n < hl {
            assert!(matches!(err, CodecError::Truncated { .. }), "{n}: {err}");
        } else {
            assert!(
                matches!(err, CodecError::LengthMismatch { expected, actual } if expected == bytes.len() as u64 && actual == n as u64),
                "{n}: {err}"
            );
        }
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        decode_segment(&longer),
        Err(CodecError::LengthMismatch { .. })
    ));
}

/// Objects whose checksums are right but whose content lies.
#[test]
fn segment_semantic_errors() {
    let mut rng = StdRng::seed_from_u64(7);
    let txns = random_txns(&mut rng, 512, 100, 3);
    let good = encode_segment(&meta(512), &txns).unwrap();
    let dec = |b: &[u8]| decode_segment(b).unwrap_err();

    // Body-level: build with the unchecked encoder.
    let raw = |t: &[Txn]| encode_segment_unchecked(&meta(512), t).unwrap();
    let mut t = txns.clone();
    t[1].txid = 500;
    t[2].txid = 501;
    assert!(
        matches!(dec(&raw(&t)), CodecError::BadHeader(_)),
        "range vs count"
    );
    let mut t = txns.clone();
    t[1].txid = 105;
    let e = dec(&raw(&t));
    assert!(
        matches!(
            e,
            CodecError::TxidNotConsecutive {
                index: 1,
                expected: 101,
                found: 105
            }
        ),
        "{e}"
    );
    let mut t = txns.clone();
    t[1].pre_checksum ^= 4;
    assert!(matches!(
        dec(&raw(&t)),
        CodecError::ChecksumChain { txid: 101, .. }
    ));
    let mut t = txns.clone();
    t[0].pages[0].0 = 0;
    assert!(matches!(dec(&raw(&t)), CodecError::PageZero { txid: 100 }));
    let mut t = txns.clone();
    let p = t[0].pages[0].0;
    t[0].pages[0].1 = Bytes::from(vec![1u8; 511]);
    assert!(
        matches!(dec(&raw(&t)), CodecError::PageLength { txid: 100, pgno, len: 511, .. } if pgno == p)
    );
    let mut t = txns.clone();
    let d = t[0].pages[0].clone();
    t[0].pages.push(d);
    assert!(matches!(
        dec(&raw(&t)),
        CodecError::PagesNotAscending { txid: 100, .. }
    ));
    let mut t = txns.clone();
    t[0].db_size_pages = 0;
    assert!(matches!(
        dec(&raw(&t)),
        CodecError::PageBeyondDbSize {
            txid: 100,
            db_size: 0,
            ..
        }
    ));
    let mut t = txns.clone();
    t[1].epoch = 1;
    let e = dec(&raw(&t));
    assert!(
        matches!(
            e,
            CodecError::EpochRegressed {
                txid: 101,
                epoch: 1,
                ..
            }
        ),
        "{e}"
    );

    // Header fields that disagree with the body (offsets per FORMAT.md).
    let e = dec(&patch_segment(&good, |b| {
        put64(b, 24, 101);
        put64(b, 32, 103);
    }));
    assert!(
        matches!(
            e,
            CodecError::TxidNotConsecutive {
                index: 0,
                expected: 101,
                found: 100
            }
        ),
        "{e}"
    );
    let e = dec(&patch_segment(&good, |b| put64(b, 40, 1)));
    assert!(
        matches!(
            e,
            CodecError::HeaderBodyMismatch {
                field: "pre_checksum",
                ..
            }
        ),
        "{e}"
    );
    let e = dec(&patch_segment(&good, |b| put64(b, 48, 1)));
    assert!(
        matches!(
            e,
            CodecError::HeaderBodyMismatch {
                field: "post_checksum",
                ..
            }
        ),
        "{e}"
    );
    let e = dec(&patch_segment(&good, |b| put64(b, 16, 999)));
    assert!(
        matches!(e, CodecError::HeaderBodyMismatch { field: "epoch", .. }),
        "{e}"
    );
    let e = dec(&patch_segment(&good, |b| put64(b, 16, 0)));
    assert!(
        matches!(e, CodecError::HeaderBodyMismatch { field: "epoch", .. }),
        "{e}"
    );
    let total = be32(&good, 68);
    let e = dec(&patch_segment(&good, |b| put32(b, 68, total + 1)));
    assert!(
        matches!(
            e,
            CodecError::HeaderBodyMismatch {
                field: "page_total",
                ..
            }
        ),
        "{e}"
    );
    let e = dec(&patch_segment(&good, |b| put32(b, 68, total - 1)));
    assert!(
        matches!(
            e,
            CodecError::HeaderBodyMismatch {
                field: "page_total",
                ..
            }
        ),
        "{e}"
    );
    let rawlen = be64(&good, 80);
    let e = dec(&patch_segment(&good, |b| put64(b, 80, rawlen + 1)));
    assert!(
        matches!(
            e,
            CodecError::HeaderBodyMismatch {
                field: "raw_len",
                ..
            }
        ),
        "{e}"
    );
    let e = dec(&patch_segment(&good, |b| {
        put64(b, 80, MAX_SEGMENT_RAW_LEN + 1)
    }));
    assert!(matches!(e, CodecError::BadHeader(_)), "{e}");
    let e = dec(&patch_segment(&good, |b| {
        put64(b, 32, 101);
        put32(b, 64, 2);
    }));
    assert!(
        matches!(e, CodecError::BodyContinues { txn_count: 2 }),
        "{e}"
    );
    let e = dec(&patch_segment(&good, |b| {
        put64(b, 32, 103);
        put32(b, 64, 4);
    }));
    assert!(
        matches!(
            e,
            CodecError::HeaderBodyMismatch {
                field: "txn_count",
                ..
            } | CodecError::Truncated { .. }
        ),
        "{e}"
    );
    let e = dec(&patch_segment(&good, |b| put32(b, 12, 1024)));
    assert!(
        matches!(
            e,
            CodecError::PageLength {
                page_size: 1024,
                ..
            }
        ),
        "{e}"
    );
    let e = dec(&patch_segment(&good, |b| put32(b, 12, 1000)));
    assert!(matches!(e, CodecError::BadPageSize(1000)), "{e}");
    // Garbage instead of a zstd frame.
    let hl = be16(&good, 10) as usize;
    let e = dec(&patch_segment(&good, |b| {
        b[hl..hl + 4].copy_from_slice(b"nope")
    }));
    assert!(matches!(e, CodecError::Decompress { .. }), "{e}");
}

/// Random segments round-trip; random damage is always rejected, never panics.
#[test]
fn segment_randomized() {
    let mut rng = StdRng::seed_from_u64(8);
    for round in 0..60 {
        let ps = 1u32 << rng.gen_range(9..=13);
        let n = rng.gen_range(1..8);
        let start = rng.gen_range(1..1u64 << 40);
        let txns = random_txns(&mut rng, ps, start, n);
        let bytes = encode_segment(&meta(ps), &txns).unwrap();
        assert_eq!(decode_segment(&bytes).unwrap().txns, txns, "round {round}");
        for _ in 0..10 {
            let mut b = bytes.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            if b != bytes {
                assert!(decode_segment(&b).is_err(), "round {round}");
            }
            let cut = rng.gen_range(0..b.len());
            assert!(decode_segment(&b[..cut]).is_err());
        }
    }
}

// ---------------------------------------------------------------------------
// Snapshots

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
