use super::*;

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
