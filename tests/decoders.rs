//! Property tests of every decoder that reads objects others can write to the
//! bucket: segments and snapshots (`journal::codec`), `manifest.json`,
//! `lease.json` and the old tool's `sqlite/manifest.json`.
//!
//! For each: valid objects round-trip; arbitrary bytes and mutated valid
//! objects (bit flips, truncation, extension, a length or count field set to
//! an extreme value with the checksums recomputed so the decoder gets past
//! them) never panic, never allocate more than a bound set by the object's
//! size, and when refused, the error names the object and the region at fault.
//!
//! 256 cases per property; `MEMBRIDGE_PROPTEST_CASES=100000` runs more.
//! Pure computation, no bucket or mount: runs in seconds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::Write;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use membridge::journal::codec::{
    self, decode_segment, encode_segment, encode_snapshot, parse_segment_header, SegmentMeta,
    SnapshotMeta, SnapshotReader, Txn,
};
use membridge::lease::Lease;
use membridge::replica::legacy;
use membridge::replica::manifest::{
    Adoption, DbManifest, EpochStart, FileEntry, Manifest, SnapshotRef,
};
use membridge::sqlite::checksum::page_hash;

// ---------------------------------------------------------------------------
// Allocation accounting: live heap bytes of the current thread, and their peak.

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    // try_with: the allocator also runs while thread-locals are torn down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every method forwards to `System` with the caller's own pointer and
// layout, so `System` upholds the GlobalAlloc contract; the bookkeeping only
// touches two const-initialised thread-local integers, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged (see the impl).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged (see the impl).
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.dealloc(ptr, layout) };
        account(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged (see the impl).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`; returns its result and the most heap it held at once (bytes
/// above what was live when it started).
fn peak_heap<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let r = f();
    let peak = PEAK.with(Cell::get);
    (r, (peak - start).max(0) as usize)
}

/// What a decoder may hold for an object of `len` bytes: a fixed allowance
/// (decompression buffers, one snapshot frame of at most 1 MiB, a page) plus a
/// multiple of the input (the decoded content of these small test objects,
/// JSON trees). A decoder that sized a buffer from a corrupted count or
/// length field would need gigabytes.
fn heap_bound(len: usize) -> usize {
    (2 << 20) + 64 * len
}

fn config() -> ProptestConfig {
    let cases = std::env::var("MEMBRIDGE_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        // The failing input is printed; nothing is written next to the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Mutations

/// Something done to a valid object's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    /// Flip one bit; the checksums are left as they are.
    Flip(Index, u8),
    /// Keep only a prefix.
    Truncate(Index),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Set a length, count or offset field (big-endian, its own width) to
    /// `value`, then recompute the checksums over it.
    Field(Index, u64),
    /// Overwrite one byte inside the object, then recompute the checksums, so
    /// the change reaches the structure behind them (a compressed body, a frame).
    Resealed(Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let value = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::from(u16::MAX)),
        Just(u64::from(u32::MAX)),
        Just(u64::MAX),
        0u64..=70_000,
        any::<u64>(),
    ];
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<Index>().prop_map(Mutation::Truncate),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        (any::<Index>(), value).prop_map(|(i, v)| Mutation::Field(i, v)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Resealed(i, b)),
    ]
}

fn put_be(b: &mut [u8], at: usize, width: usize, value: u64) {
    let v = value.to_be_bytes();
    b[at..at + width].copy_from_slice(&v[8 - width..]);
}

fn seal(b: &mut [u8], crc_at: usize, over: std::ops::Range<usize>) {
    let crc = crc32fast::hash(&b[over]);
    b[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
}

// ---------------------------------------------------------------------------
// Segments

fn meta(page_size: u32) -> SegmentMeta {
    SegmentMeta {
        db_name: "claude-mem.db".into(),
        node_id: "node-a".into(),
        page_size,
        created_ms: 1_700_000_000_123,
    }
}

/// A chain of 1..=4 transactions from a seed: consecutive txids, chained
/// checksums, non-decreasing epochs, ascending in-range pages whose content
/// is partly random, partly repeated (so zstd has work to do).
fn txns_from(seed: u64, page_size: u32) -> Vec<Txn> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut txid = rng.gen_range(1..u64::MAX / 2);
    let mut epoch = rng.gen_range(1..1000);
    let mut checksum: u64 = rng.gen();
    (0..rng.gen_range(1..=4))
        .map(|_| {
            let size = rng.gen_range(1..=8u32);
            let mut pgnos: Vec<u32> = (0..rng.gen_range(0..=4))
                .map(|_| rng.gen_range(1..=size))
                .collect();
            pgnos.sort_unstable();
            pgnos.dedup();
            let pages = pgnos
                .into_iter()
                .map(|p| {
                    let fill: u8 = rng.gen();
                    let d: Vec<u8> = (0..page_size as usize)
                        .map(|k| if k % 64 < 8 { rng.gen() } else { fill })
                        .collect();
                    (p, Bytes::from(d))
                })
                .collect();
            let post: u64 = rng.gen();
            epoch += u64::from(rng.gen_range(0..4) == 0);
            let t = Txn {
                txid,
                epoch,
                db_size_pages: size,
                pre_checksum: checksum,
                post_checksum: post,
                timestamp_ms: rng.gen(),
                pages,
            };
            txid += 1;
            checksum = post;
            t
        })
        .collect()
}

fn page_size() -> impl Strategy<Value = u32> {
    prop_oneof![Just(512u32), Just(1024), Just(4096)]
}

/// Length, count and offset fields of a segment header: (offset, width).
const SEGMENT_FIELDS: &[(usize, usize)] = &[
    (10, 2), // header_len
    (12, 4), // page_size
    (16, 8), // epoch
    (24, 8), // txid_from
    (32, 8), // txid_to
    (64, 4), // txn_count
    (68, 4), // page_total
    (72, 8), // body_len
    (80, 8), // raw_len
    (88, 1), // db_name length
];

/// Applies `m` to a segment; the checksums are recomputed where `m` asks.
fn mutate_segment(valid: &[u8], m: &Mutation) -> Vec<u8> {
    let hl = usize::from(u16::from_be_bytes([valid[10], valid[11]]));
    let mut b = valid.to_vec();
    let reseal = |b: &mut Vec<u8>| {
        seal(b, hl - 4, 0..hl - 4);
        let end = b.len() - 4;
        seal(b, end, 0..end);
    };
    match m {
        Mutation::Flip(i, bit) => b[i.index(valid.len())] ^= 1 << bit,
        Mutation::Truncate(i) => b.truncate(i.index(valid.len())),
        Mutation::Extend(tail) => b.extend_from_slice(tail),
        Mutation::Field(i, v) => {
            let (at, width) = *i.get(SEGMENT_FIELDS);
            put_be(&mut b, at, width, *v);
            reseal(&mut b);
        }
        Mutation::Resealed(i, byte) => {
            b[i.index(valid.len() - 4)] = *byte;
            reseal(&mut b);
        }
    }
    b
}

/// The region words a codec error may use to say where the object is wrong.
const CODEC_REGIONS: &[&str] = &[
    "header",
    "body",
    "index",
    "footer",
    "frame",
    "whole-file",
    "transaction",
];

/// A refusal names the region at fault. (The object is named by the caller,
/// which has the key: restore's `Corrupt` error says "<key>: corrupt segment: ...".)
fn assert_names_region(object: &str, err: &codec::CodecError) {
    let msg = err.to_string();
    assert!(
        CODEC_REGIONS.iter().any(|r| msg.contains(r)),
        "the error names no region of the {object}: {msg}"
    );
}

fn check_segment_decoders(bytes: &[u8]) {
    let (r, heap) = peak_heap(|| decode_segment(bytes));
    assert!(
        heap <= heap_bound(bytes.len()),
        "decode_segment held {heap} bytes for a {}-byte object",
        bytes.len()
    );
    if let Err(e) = &r {
        assert_names_region("segment", e);
    }
    let (h, heap) = peak_heap(|| parse_segment_header(bytes));
    assert!(
        heap <= heap_bound(bytes.len()),
        "parse_segment_header held {heap} bytes"
    );
    if let Err(e) = &h {
        assert_names_region("segment", e);
    }
    // A decoded segment is one the header parser accepts too.
    if r.is_ok() {
        assert!(h.is_ok());
    }
}

/// Builds a segment from a body given uncompressed, with a header that
/// agrees with the transactions `txns` it claims to hold: lets a test change
/// a field inside the body behind the compression and the checksums.
fn segment_with_raw_body(txns: &[Txn], page_size: u32, raw: &[u8]) -> Vec<u8> {
    segment_with_window(txns, page_size, raw, None)
}

/// As [`segment_with_raw_body`], with the zstd window (log2 bytes) the body's
/// frame header declares set to `window_log`.
fn segment_with_window(
    txns: &[Txn],
    page_size: u32,
    raw: &[u8],
    window_log: Option<u32>,
) -> Vec<u8> {
    let first = &txns[0];
    let last = txns.last().unwrap();
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    if let Some(log) = window_log {
        enc.window_log(log).unwrap();
    }
    enc.write_all(raw).unwrap();
    let body = enc.finish().unwrap();
    let mut h = Vec::new();
    h.extend_from_slice(codec::SEGMENT_MAGIC);
    h.extend_from_slice(&codec::FORMAT_VERSION.to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&page_size.to_be_bytes());
    h.extend_from_slice(&last.epoch.to_be_bytes());
    h.extend_from_slice(&first.txid.to_be_bytes());
    h.extend_from_slice(&last.txid.to_be_bytes());
    h.extend_from_slice(&first.pre_checksum.to_be_bytes());
    h.extend_from_slice(&last.post_checksum.to_be_bytes());
    h.extend_from_slice(&0i64.to_be_bytes());
    h.extend_from_slice(&(txns.len() as u32).to_be_bytes());
    let pages: usize = txns.iter().map(|t| t.pages.len()).sum();
    h.extend_from_slice(&(pages as u32).to_be_bytes());
    h.extend_from_slice(&(body.len() as u64).to_be_bytes());
    h.extend_from_slice(&(raw.len() as u64).to_be_bytes());
    for name in ["claude-mem.db", "node-a"] {
        h.push(name.len() as u8);
        h.extend_from_slice(name.as_bytes());
    }
    let hl = h.len() + 4;
    h[10..12].copy_from_slice(&(hl as u16).to_be_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_be_bytes());
    h.extend_from_slice(&body);
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_be_bytes());
    h
}

/// The uncompressed body of `txns` (docs/FORMAT.md §3.2), and the offsets of
/// its count and length fields: (offset, width).
fn raw_body(txns: &[Txn]) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut raw = Vec::new();
    let mut fields = Vec::new();
    for t in txns {
        fields.push((raw.len() + 16, 4)); // db_size_pages
        fields.push((raw.len() + 44, 4)); // page_count
        raw.extend_from_slice(&t.txid.to_be_bytes());
        raw.extend_from_slice(&t.epoch.to_be_bytes());
        raw.extend_from_slice(&t.db_size_pages.to_be_bytes());
        raw.extend_from_slice(&t.pre_checksum.to_be_bytes());
        raw.extend_from_slice(&t.post_checksum.to_be_bytes());
        raw.extend_from_slice(&t.timestamp_ms.to_be_bytes());
        raw.extend_from_slice(&(t.pages.len() as u32).to_be_bytes());
        for (pgno, data) in &t.pages {
            fields.push((raw.len(), 4)); // pgno
            fields.push((raw.len() + 4, 4)); // len
            raw.extend_from_slice(&pgno.to_be_bytes());
            raw.extend_from_slice(&(data.len() as u32).to_be_bytes());
            raw.extend_from_slice(data);
        }
    }
    (raw, fields)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn segments_round_trip(seed in any::<u64>(), ps in page_size()) {
        let txns = txns_from(seed, ps);
        let bytes = encode_segment(&meta(ps), &txns).unwrap();
        let seg = decode_segment(&bytes).unwrap();
        prop_assert_eq!(&seg.txns, &txns);
        prop_assert_eq!(seg.header.txid_from, txns[0].txid);
        prop_assert_eq!(seg.header.txid_to, txns.last().unwrap().txid);
        prop_assert_eq!(seg.header.object_len(), bytes.len() as u64);
        prop_assert_eq!(parse_segment_header(&bytes).unwrap(), seg.header);
        // The test's own encoder is the format as documented: same bytes out.
        let (raw, _) = raw_body(&txns);
        let again = decode_segment(&segment_with_raw_body(&txns, ps, &raw)).unwrap();
        prop_assert_eq!(again.txns, txns);
    }

    #[test]
    fn segments_refuse_arbitrary_bytes(
        mut bytes in prop::collection::vec(any::<u8>(), 0..2048),
        magic in any::<bool>(),
    ) {
        if magic && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(codec::SEGMENT_MAGIC);
        }
        check_segment_decoders(&bytes);
        prop_assert!(decode_segment(&bytes).is_err());
    }

    #[test]
    fn segments_refuse_mutations(
        seed in any::<u64>(),
        ps in page_size(),
        m in mutation(),
    ) {
        let txns = txns_from(seed, ps);
        let valid = encode_segment(&meta(ps), &txns).unwrap();
        let bytes = mutate_segment(&valid, &m);
        check_segment_decoders(&bytes);
    }

    /// A count or length inside the compressed body, set to an extreme value
    /// behind valid checksums.
    #[test]
    fn segments_refuse_corrupt_body_fields(
        seed in any::<u64>(),
        ps in page_size(),
        field in any::<Index>(),
        value in prop_oneof![Just(0u64), Just(u64::from(u32::MAX)), any::<u32>().prop_map(u64::from)],
        cut in any::<Option<Index>>(),
    ) {
        let txns = txns_from(seed, ps);
        let (mut raw, fields) = raw_body(&txns);
        let (at, width) = *field.get(&fields);
        put_be(&mut raw, at, width, value);
        if let Some(cut) = cut {
            raw.truncate(cut.index(raw.len()));
        }
        let bytes = segment_with_raw_body(&txns, ps, &raw);
        check_segment_decoders(&bytes);
    }
}

/// The window is a length field too, one the decompressor trusts: a body
/// whose frame header asks for 128 MiB (zstd's own limit) would have the
/// decoder allocate that before it reads a byte. Refused, naming the body;
/// the largest window accepted decodes.
#[test]
fn segments_refuse_a_body_that_asks_for_a_huge_window() {
    let txns = txns_from(7, 512);
    let (raw, _) = raw_body(&txns);
    let ok = segment_with_window(&txns, 512, &raw, Some(codec::MAX_WINDOW_LOG));
    assert_eq!(decode_segment(&ok).unwrap().txns, txns);
    let huge = segment_with_window(&txns, 512, &raw, Some(27));
    let Err(err) = decode_segment(&huge) else {
        panic!("a body asking for a 128 MiB window is accepted");
    };
    assert!(
        matches!(
            err,
            codec::CodecError::Decompress {
                region: codec::Region::Body,
                ..
            }
        ),
        "{err}"
    );
    assert_names_region("segment", &err);
}

// ---------------------------------------------------------------------------
// Snapshots

/// An image of 0..=40 pages (so several frames at 4 KiB pages, and a short
/// last one) and the meta that describes it.
fn image_from(seed: u64, page_size: u32) -> (SnapshotMeta, Vec<u8>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let pages = rng.gen_range(0..=40u32);
    let mut image = Vec::with_capacity(pages as usize * page_size as usize);
    let mut checksum = 0u64;
    for pgno in 1..=pages {
        let fill: u8 = rng.gen();
        let page: Vec<u8> = (0..page_size as usize)
            .map(|k| if k % 128 < 4 { rng.gen() } else { fill })
            .collect();
        checksum ^= page_hash(pgno, &page);
        image.extend_from_slice(&page);
    }
    let meta = SnapshotMeta {
        db_name: "claude-mem.db".into(),
        node_id: "node-a".into(),
        txid: rng.gen(),
        epoch: rng.gen(),
        page_size,
        page_count: pages,
        db_checksum: checksum,
        timestamp_ms: rng.gen(),
    };
    (meta, image)
}

/// Applies `m` to a snapshot; the checksums (header, frames, index, whole
/// file) are recomputed where `m` asks.
fn mutate_snapshot(valid: &[u8], m: &Mutation) -> Vec<u8> {
    let reader = SnapshotReader::from_bytes(valid).unwrap();
    let hl = usize::from(u16::from_be_bytes([valid[10], valid[11]]));
    let n = valid.len();
    let footer = n - 24;
    let index_at = footer - reader.index().len() * 16;
    // Length, count and offset fields: header, each index entry, footer.
    let mut fields = vec![(10, 2), (12, 4), (32, 4), (36, 2), (56, 1)];
    for k in 0..reader.index().len() {
        fields.push((index_at + 16 * k, 8)); // frame offset
        fields.push((index_at + 16 * k + 8, 4)); // frame length
    }
    fields.push((footer, 8)); // index offset
    let mut b = valid.to_vec();
    let reseal = |b: &mut Vec<u8>| {
        seal(b, hl - 4, 0..hl - 4);
        for (k, e) in reader.index().iter().enumerate() {
            let s = e.offset as usize;
            seal(b, index_at + 16 * k + 12, s..s + e.len as usize);
        }
        seal(b, footer + 8, index_at..footer);
        seal(b, n - 4, 0..n - 4);
    };
    match m {
        Mutation::Flip(i, bit) => b[i.index(n)] ^= 1 << bit,
        Mutation::Truncate(i) => b.truncate(i.index(n)),
        Mutation::Extend(tail) => b.extend_from_slice(tail),
        Mutation::Field(i, v) => {
            let (at, width) = *i.get(&fields);
            put_be(&mut b, at, width, *v);
            reseal(&mut b);
        }
        Mutation::Resealed(i, byte) => {
            b[i.index(n - 4)] = *byte;
            reseal(&mut b);
        }
    }
    b
}

/// Every way a snapshot is read: whole (restore), and by range reads: the
/// header from a prefix, the index from the suffix, then single frames.
fn check_snapshot_decoders(bytes: &[u8]) {
    let bound = heap_bound(bytes.len());
    let (r, heap) = peak_heap(|| codec::decode_snapshot(bytes));
    assert!(
        heap <= bound,
        "decode_snapshot held {heap} bytes for {}",
        bytes.len()
    );
    if let Err(e) = &r {
        assert_names_region("snapshot", e);
    }
    let prefix = &bytes[..bytes.len().min(codec::SNAPSHOT_MAX_HEADER_LEN)];
    let (h, heap) = peak_heap(|| SnapshotReader::parse_header(prefix));
    assert!(heap <= bound, "parse_header held {heap} bytes");
    let header = match h {
        Ok(h) => h,
        Err(e) => return assert_names_region("snapshot", &e),
    };
    let suffix_len = header.index_suffix_len().min(bytes.len() as u64) as usize;
    let suffix = &bytes[bytes.len() - suffix_len..];
    let (reader, heap) = peak_heap(|| SnapshotReader::new(header, suffix));
    assert!(heap <= bound, "SnapshotReader::new held {heap} bytes");
    let reader = match reader {
        Ok(r) => r,
        Err(e) => return assert_names_region("snapshot", &e),
    };
    for (k, e) in reader.index().iter().enumerate() {
        let s = (e.offset as usize).min(bytes.len());
        let frame = &bytes[s..(s + e.len as usize).min(bytes.len())];
        let (pages, heap) = peak_heap(|| reader.decode_frame(k as u32, frame));
        assert!(heap <= bound, "decode_frame held {heap} bytes");
        if let Err(e) = pages {
            assert_names_region("snapshot", &e);
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn snapshots_round_trip(seed in any::<u64>(), ps in page_size()) {
        let (meta, image) = image_from(seed, ps);
        let bytes = encode_snapshot(meta.clone(), &image).unwrap();
        let (h, back) = codec::decode_snapshot(&bytes).unwrap();
        prop_assert_eq!(&back, &image);
        prop_assert_eq!((h.txid, h.page_count, h.db_checksum), (meta.txid, meta.page_count, meta.db_checksum));
        // By range reads: header from a prefix, index from the suffix, pages by frame.
        let h = SnapshotReader::parse_header(&bytes[..codec::SNAPSHOT_MAX_HEADER_LEN.min(bytes.len())]).unwrap();
        let suffix = &bytes[bytes.len() - h.index_suffix_len() as usize..];
        let r = SnapshotReader::new(h, suffix).unwrap();
        prop_assert_eq!(r.object_len(), bytes.len() as u64);
        for pgno in 1..=meta.page_count {
            let (at, len) = r.page_range(pgno).unwrap();
            let frame = &bytes[at as usize..at as usize + len as usize];
            let page = r.decode_page(frame, pgno).unwrap();
            let want = (pgno as usize - 1) * ps as usize;
            prop_assert_eq!(&page[..], &image[want..want + ps as usize]);
        }
    }

    #[test]
    fn snapshots_refuse_arbitrary_bytes(
        mut bytes in prop::collection::vec(any::<u8>(), 0..2048),
        magic in any::<bool>(),
    ) {
        if magic && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(codec::SNAPSHOT_MAGIC);
        }
        check_snapshot_decoders(&bytes);
        prop_assert!(codec::decode_snapshot(&bytes).is_err());
    }

    #[test]
    fn snapshots_refuse_mutations(seed in any::<u64>(), ps in page_size(), m in mutation()) {
        let (meta, image) = image_from(seed, ps);
        let valid = encode_snapshot(meta, &image).unwrap();
        let bytes = mutate_snapshot(&valid, &m);
        check_snapshot_decoders(&bytes);
    }
}

// ---------------------------------------------------------------------------
// JSON objects: manifest.json, lease.json, the old tool's sqlite/manifest.json

/// Byte-level mutations of a JSON document: flips, truncation, extension.
fn mutate_json(valid: &[u8], m: &Mutation) -> Vec<u8> {
    let mut b = valid.to_vec();
    match m {
        Mutation::Flip(i, bit) => b[i.index(valid.len())] ^= 1 << bit,
        Mutation::Truncate(i) => b.truncate(i.index(valid.len())),
        Mutation::Extend(tail) => b.extend_from_slice(tail),
        Mutation::Field(i, v) => {
            // A number where the document has one: its digits replaced.
            let digits: Vec<usize> = (0..b.len()).filter(|&k| b[k].is_ascii_digit()).collect();
            if !digits.is_empty() {
                let at = *i.get(&digits);
                let end = (at..b.len())
                    .find(|&k| !b[k].is_ascii_digit())
                    .unwrap_or(b.len());
                b.splice(at..end, v.to_string().into_bytes());
            }
        }
        Mutation::Resealed(i, byte) => {
            let at = i.index(b.len());
            b[at] = *byte;
        }
    }
    b
}

/// JSON values of every type, nested a little: replacing a field's value
/// with one of these makes a mistyped or out-of-range field.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "[a-z0-9 .:+-]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `v` with the field at `path` (object keys) replaced by `with`.
fn replace_field(v: &mut serde_json::Value, pick: &[Index], with: serde_json::Value) {
    let mut cur = v;
    for (depth, i) in pick.iter().enumerate() {
        let Some(obj) = cur.as_object_mut() else {
            break;
        };
        if obj.is_empty() {
            break;
        }
        let key = obj.keys().nth(i.index(obj.len())).unwrap().clone();
        let next = obj.get_mut(&key).unwrap();
        if depth + 1 == pick.len() || !next.is_object() {
            *next = with;
            return;
        }
        cur = next;
    }
}

/// A refused JSON object: the error names the object by its key, and the
/// region by position, by field name (one of `fields`), or as the whole
/// document not being an object.
fn assert_json_refusal(key: &str, msg: &str, fields: &[&str]) {
    assert!(msg.contains(key), "the error does not name {key}: {msg}");
    let region = msg.contains(" line ")
        || msg.contains("not a JSON object")
        || fields.iter().any(|f| msg.contains(f));
    assert!(region, "the error names no region of {key}: {msg}");
}

const CID: &str = "2a97516c354b6884";

fn manifest_from(seed: u64) -> Manifest {
    let mut rng = StdRng::seed_from_u64(seed);
    let s = |rng: &mut StdRng, n: usize| -> String {
        (0..rng.gen_range(0..n))
            .map(|_| rng.gen_range(b'a'..=b'z') as char)
            .collect()
    };
    let mut m = Manifest::new(CID, &s(&mut rng, 12), rng.gen());
    m.updated_at = s(&mut rng, 30);
    for _ in 0..rng.gen_range(0..3) {
        let mut start = BTreeMap::new();
        start.insert(s(&mut rng, 10), rng.gen());
        m.epochs.push(EpochStart {
            epoch: rng.gen(),
            start_txid: start,
        });
    }
    for _ in 0..rng.gen_range(0..3) {
        let snap = |rng: &mut StdRng| SnapshotRef {
            txid: rng.gen(),
            key: s(rng, 40),
            checksum: format!("{:016x}", rng.gen::<u64>()),
            size_pages: rng.gen(),
            taken_at: s(rng, 30),
        };
        let snapshot = rng.gen::<bool>().then(|| snap(&mut rng));
        let older = (0..rng.gen_range(0..3)).map(|_| snap(&mut rng)).collect();
        m.databases.insert(
            s(&mut rng, 16),
            DbManifest {
                generation: rng.gen(),
                head_txid: rng.gen(),
                head_checksum: format!("{:016x}", rng.gen::<u64>()),
                page_size: rng.gen(),
                size_pages: rng.gen(),
                snapshot,
                older_snapshots: older,
            },
        );
    }
    if rng.gen() {
        m.adopted = Some(Adoption {
            from_key: s(&mut rng, 30),
            sha256: s(&mut rng, 64),
            legacy_timestamp: rng.gen::<bool>().then(|| s(&mut rng, 30)),
            legacy_source_host: rng.gen::<bool>().then(|| s(&mut rng, 10)),
            lease_epoch: rng.gen::<bool>().then(|| rng.gen()),
            by: s(&mut rng, 10),
            at: s(&mut rng, 30),
        });
    }
    for _ in 0..rng.gen_range(0..3) {
        m.files.insert(
            s(&mut rng, 20),
            FileEntry {
                sha256: s(&mut rng, 64),
                size: rng.gen(),
                key: s(&mut rng, 40),
                deleted: rng.gen(),
            },
        );
    }
    if rng.gen() {
        // A field from a newer writer, kept as read.
        m.extra
            .insert("x_newer".into(), serde_json::json!({"n": rng.gen::<u32>()}));
    }
    m
}

fn check_manifest(bytes: &[u8]) {
    let (r, heap) = peak_heap(|| Manifest::parse("m/manifest.json", bytes, CID));
    assert!(
        heap <= heap_bound(bytes.len()),
        "Manifest::parse held {heap} bytes"
    );
    if let Err(e) = r {
        let msg = e.to_string();
        assert!(msg.contains("m/manifest.json"), "{msg}");
        if msg.contains("not a membridge manifest") {
            assert_json_refusal("m/manifest.json", &msg, &[]);
        }
    }
}

fn lease_json(seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let issued: i64 = rng.gen_range(0..4_000_000_000);
    let mut v = serde_json::json!({
        "canonical_id": CID,
        "primary_node_id": format!("node-{}", rng.gen::<u16>()),
        "issued_at": issued,
        "expires_at": issued + rng.gen_range(0..100_000),
        "lease_seconds": rng.gen::<u32>(),
        "epoch": rng.gen::<u64>(),
        "policy": "auto",
        "issued_by": "node-b",
    });
    if rng.gen() {
        v["needs_ui_selection"] = rng.gen::<bool>().into();
    }
    if rng.gen() {
        v["membridge_session"] = format!("{:x}", rng.gen::<u64>()).into();
    }
    serde_json::to_vec_pretty(&v).unwrap()
}

fn check_lease(bytes: &[u8]) {
    let (r, heap) = peak_heap(|| Lease::parse("l/lease.json", bytes, CID));
    assert!(
        heap <= heap_bound(bytes.len()),
        "Lease::parse held {heap} bytes"
    );
    if let Err(e) = r {
        let msg = e.to_string();
        assert!(msg.contains("l/lease.json"), "{msg}");
        if msg.contains("malformed lease") {
            assert_json_refusal("l/lease.json", &msg, &["primary_node_id"]);
        }
    }
}

fn legacy_json(seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let m = legacy::LegacyManifest {
        project: "claude-mem".into(),
        canonical_id: CID.into(),
        timestamp: "2026-02-25T10:11:12.123456+00:00".into(),
        source_host: format!("host-{}", rng.gen::<u16>()),
        db_size: rng.gen(),
        sha256: format!("{:064x}", rng.gen::<u128>()),
        observations: rng.gen::<bool>().then(|| rng.gen()),
        session_summaries: rng.gen::<bool>().then(|| rng.gen()),
        user_prompts: None,
        tables: rng.gen_range(0..40),
        table_names: vec!["observations".into()],
        membridge_txid: rng.gen::<bool>().then(|| rng.gen()),
    };
    serde_json::to_vec_pretty(&m).unwrap()
}

fn check_legacy(bytes: &[u8]) {
    let (r, heap) = peak_heap(|| legacy::read_manifest("sqlite/manifest.json", bytes));
    assert!(
        heap <= heap_bound(bytes.len()),
        "read_manifest held {heap} bytes"
    );
    if let Err(e) = r {
        let fields = ["`canonical_id`", "`source_host`", "`timestamp`", "`sha256`"];
        assert_json_refusal("sqlite/manifest.json", &e.to_string(), &fields);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn manifests_round_trip(seed in any::<u64>()) {
        let m = manifest_from(seed);
        let body = serde_json::to_vec_pretty(&m).unwrap();
        prop_assert_eq!(Manifest::parse("k", &body, CID).unwrap(), m);
    }

    #[test]
    fn manifests_refuse_arbitrary_and_mutated_bytes(
        seed in any::<u64>(),
        m in mutation(),
        arbitrary in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        check_manifest(&arbitrary);
        let valid = serde_json::to_vec_pretty(&manifest_from(seed)).unwrap();
        check_manifest(&mutate_json(&valid, &m));
    }

    #[test]
    fn manifests_refuse_mistyped_fields(
        seed in any::<u64>(),
        pick in prop::collection::vec(any::<Index>(), 1..4),
        with in json_value(),
    ) {
        let mut v = serde_json::to_value(manifest_from(seed)).unwrap();
        replace_field(&mut v, &pick, with);
        check_manifest(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn leases_round_trip(seed in any::<u64>()) {
        let body = lease_json(seed);
        let l = Lease::parse("k", &body, CID).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&l.to_json()).unwrap();
        let orig: serde_json::Value = serde_json::from_slice(&body).unwrap();
        prop_assert_eq!(back, orig);
    }

    #[test]
    fn leases_refuse_arbitrary_and_mutated_bytes(
        seed in any::<u64>(),
        m in mutation(),
        arbitrary in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        check_lease(&arbitrary);
        check_lease(&mutate_json(&lease_json(seed), &m));
    }

    #[test]
    fn leases_refuse_mistyped_fields(
        seed in any::<u64>(),
        pick in any::<Index>(),
        with in json_value(),
    ) {
        let mut v: serde_json::Value = serde_json::from_slice(&lease_json(seed)).unwrap();
        replace_field(&mut v, &[pick], with);
        check_lease(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn legacy_manifests_round_trip(seed in any::<u64>()) {
        let body = legacy_json(seed);
        let read = legacy::read_manifest("k", &body).unwrap();
        let orig: legacy::LegacyManifest = serde_json::from_slice(&body).unwrap();
        prop_assert_eq!(read.canonical_id.as_deref(), Some(orig.canonical_id.as_str()));
        prop_assert_eq!(read.sha256.as_deref(), Some(orig.sha256.as_str()));
        prop_assert_eq!(read.source_host.as_deref(), Some(orig.source_host.as_str()));
        prop_assert_eq!(read.timestamp.as_deref(), Some(orig.timestamp.as_str()));
    }

    #[test]
    fn legacy_manifests_refuse_arbitrary_and_mutated_bytes(
        seed in any::<u64>(),
        m in mutation(),
        arbitrary in prop::collection::vec(any::<u8>(), 0..512),
        pick in any::<Index>(),
        with in json_value(),
    ) {
        check_legacy(&arbitrary);
        let valid = legacy_json(seed);
        check_legacy(&mutate_json(&valid, &m));
        let mut v: serde_json::Value = serde_json::from_slice(&valid).unwrap();
        replace_field(&mut v, &[pick], with);
        check_legacy(&serde_json::to_vec(&v).unwrap());
    }
}
