use super::*;

#[test]
fn codec_errors_read_as_truncated_or_corrupt() {
    let t = CodecError::LengthMismatch {
        expected: 10,
        actual: 5,
    };
    assert_eq!(classify(&t), "truncated");
    let c = CodecError::Checksum {
        region: codec::Region::File,
        stored: 1,
        computed: 2,
    };
    assert_eq!(classify(&c), "corrupt");
    let e = RestoreError::Corrupt {
        key: "k.seg".into(),
        what: "segment",
        source: c,
    };
    let msg = e.to_string();
    assert!(
        msg.starts_with("k.seg: corrupt segment: whole-file checksum mismatch"),
        "{msg}"
    );
}

#[test]
fn gap_messages() {
    let e = RestoreError::ChainGap {
        key: "x-7-9.seg".into(),
        from: 7,
        at: 5,
    };
    assert_eq!(
        e.to_string(),
        "txid chain gap: segment x-7-9.seg starts at txid 7 but the chain is at 5 (txid 6 is missing)"
    );
    let e = RestoreError::ChainGap {
        key: "k".into(),
        from: 9,
        at: 5,
    };
    assert!(e.to_string().ends_with("(txids 6..=8 are missing)"));
    let e = RestoreError::ChainGap {
        key: "k".into(),
        from: 4,
        at: 5,
    };
    assert!(e.to_string().contains("overlaps"));
}

#[test]
fn sidecar_names() {
    let s = sidecars(Path::new("/a/b.db"));
    assert_eq!(
        s,
        vec![
            PathBuf::from("/a/b.db-wal"),
            PathBuf::from("/a/b.db-shm"),
            PathBuf::from("/a/b.db-journal")
        ]
    );
    assert_eq!(parent_dir(Path::new("x.db")), PathBuf::from("."));
}
