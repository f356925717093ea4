//! The codecs' tests: one per rule of docs/FORMAT.md, byte flips and
//! truncations at every offset, randomized round trips.

use super::*;
use crate::sqlite::checksum::PageHashes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub(super) fn meta(page_size: u32) -> SegmentMeta {
    SegmentMeta {
        db_name: "claude-mem.db".into(),
        node_id: "node-a".into(),
        page_size,
        created_ms: 1_700_000_000_123,
    }
}

/// A chain of `n` random transactions starting at `txid`, with checksums
/// that really are the whole-database checksums of the evolving image.
pub(super) fn random_txns(rng: &mut StdRng, page_size: u32, txid: u64, n: usize) -> Vec<Txn> {
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
pub(super) fn patch_segment(bytes: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
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

pub(super) fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
pub(super) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

mod segment;
mod snapshot;
