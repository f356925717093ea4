//! The whole-database checksum (docs/ARCHITECTURE.md §2, "Primary"), kept incrementally.
//!
//! Definition (also in docs/FORMAT.md):
//!
//! ```text
//! page_hash(n, bytes) = xxh3_64( be32(n) ++ bytes )        n = 1-based page number
//! db_checksum(db)     = page_hash(1, p1) ^ page_hash(2, p2) ^ ... ^ page_hash(N, pN)
//! ```
//!
//! where N is the database size in pages and `xxh3_64` is XXH3 64-bit with
//! the default secret and seed 0. The empty database (N = 0) has checksum 0.
//! Mixing the page number in makes the checksum sensitive to pages being
//! swapped; XOR makes it updatable per page. Pages that a transaction grows the
//! database by without writing them (e.g. the lock-byte page) count as zeros,
//! which is what they read as in the file.

use std::io::{self, Read};

use thiserror::Error;
use xxhash_rust::xxh3::Xxh3Default;

use super::header::is_valid_page_size;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChecksumError {
    #[error("invalid page size {0}")]
    BadPageSize(u32),
    #[error("database length {len} is not a multiple of the page size {page_size}")]
    PartialPage { len: u64, page_size: u32 },
    #[error("page number 0 is invalid")]
    PageZero,
    #[error("page {pgno} has {len} bytes, expected {page_size}")]
    PageLength {
        pgno: u32,
        len: usize,
        page_size: u32,
    },
    #[error("database of {0} pages is too large")]
    TooLarge(u64),
}

/// Hash of one page, as defined in the module docs.
pub fn page_hash(pgno: u32, page: &[u8]) -> u64 {
    let mut h = Xxh3Default::new();
    h.update(&pgno.to_be_bytes());
    h.update(page);
    h.digest()
}

/// Whole-database checksum of an in-memory image (length a multiple of
/// `page_size`).
pub fn db_checksum(db: &[u8], page_size: u32) -> Result<u64, ChecksumError> {
    Ok(PageHashes::from_bytes(db, page_size)?.checksum())
}

/// One hash per page plus their XOR, so that applying a transaction costs a
/// hash of each changed page only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageHashes {
    page_size: u32,
    /// `hashes[i]` is the hash of page `i + 1`.
    hashes: Vec<u64>,
    xor: u64,
}

impl PageHashes {
    /// An empty database (0 pages, checksum 0).
    pub fn new(page_size: u32) -> Result<Self, ChecksumError> {
        if !is_valid_page_size(page_size) {
            return Err(ChecksumError::BadPageSize(page_size));
        }
        Ok(Self {
            page_size,
            hashes: Vec::new(),
            xor: 0,
        })
    }

    /// Full computation over an in-memory database image.
    pub fn from_bytes(db: &[u8], page_size: u32) -> Result<Self, ChecksumError> {
        let mut s = Self::new(page_size)?;
        let ps = page_size as usize;
        if !db.len().is_multiple_of(ps) {
            return Err(ChecksumError::PartialPage {
                len: db.len() as u64,
                page_size,
            });
        }
        let n = db.len() / ps;
        if n > u32::MAX as usize {
            return Err(ChecksumError::TooLarge(n as u64));
        }
        s.hashes.reserve_exact(n);
        for (i, page) in db.chunks_exact(ps).enumerate() {
            s.push(i as u32 + 1, page);
        }
        Ok(s)
    }

    /// Full computation streaming from a reader (e.g. the database file), one
    /// page in memory at a time. A trailing partial page is an error.
    pub fn from_reader<R: Read>(mut r: R, page_size: u32) -> io::Result<Self> {
        let mut s = Self::new(page_size).map_err(io::Error::other)?;
        let mut page = vec![0u8; page_size as usize];
        loop {
            let got = read_full(&mut r, &mut page)?;
            if got == 0 {
                return Ok(s);
            }
            if got < page.len() {
                let len = s.hashes.len() as u64 * u64::from(page_size) + got as u64;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    ChecksumError::PartialPage { len, page_size },
                ));
            }
            let pgno = u32::try_from(s.hashes.len() + 1)
                .map_err(|_| io::Error::other(ChecksumError::TooLarge(s.hashes.len() as u64)))?;
            s.push(pgno, &page);
        }
    }

    /// Full computation over a database file.
    pub fn from_file(path: &std::path::Path, page_size: u32) -> io::Result<Self> {
        let f = std::fs::File::open(path)?;
        Self::from_reader(io::BufReader::with_capacity(1 << 20, f), page_size)
    }

    fn push(&mut self, pgno: u32, page: &[u8]) {
        let h = page_hash(pgno, page);
        self.hashes.push(h);
        self.xor ^= h;
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Database size in pages.
    pub fn page_count(&self) -> u32 {
        self.hashes.len() as u32
    }

    /// The whole-database checksum.
    pub fn checksum(&self) -> u64 {
        self.xor
    }

    /// The stored hash of page `pgno`, if it is within the database.
    pub fn page_hash(&self, pgno: u32) -> Option<u64> {
        self.hashes.get((pgno as usize).checked_sub(1)?).copied()
    }

    /// Applies a committed transaction: the database becomes `db_size_pages`
    /// long (pages beyond it drop out of the XOR, new pages not in `pages`
    /// count as zeros), then each page in `pages` replaces the old image.
    /// Pages numbered above `db_size_pages` are ignored, as SQLite ignores WAL
    /// frames beyond the commit's size. Returns the new checksum. The input is
    /// validated first: on error nothing changed.
    pub fn apply<'a, I>(&mut self, pages: I, db_size_pages: u32) -> Result<u64, ChecksumError>
    where
        I: IntoIterator<Item = (u32, &'a [u8])>,
        I::IntoIter: Clone,
    {
        let it = pages.into_iter();
        for (pgno, data) in it.clone() {
            self.check_page(pgno, data)?;
        }
        self.resize(db_size_pages);
        for (pgno, data) in it {
            if pgno > db_size_pages {
                continue;
            }
            let slot = &mut self.hashes[pgno as usize - 1];
            let h = page_hash(pgno, data);
            self.xor ^= *slot ^ h;
            *slot = h;
        }
        Ok(self.xor)
    }

    /// The checksum the database would have after [`PageHashes::apply`],
    /// without changing `self`. Costs the changed pages plus the pages added
    /// or dropped by the size change.
    pub fn checksum_after<'a, I>(&self, pages: I, db_size_pages: u32) -> Result<u64, ChecksumError>
    where
        I: IntoIterator<Item = (u32, &'a [u8])>,
    {
        let n = self.page_count();
        let mut xor = self.xor;
        for p in db_size_pages.min(n)..n {
            xor ^= self.hashes[p as usize];
        }
        let zero = vec![0u8; self.page_size as usize];
        // Pages written by the transaction: remember which grown pages were
        // covered so we do not also count them as zero pages.
        let mut written = std::collections::BTreeMap::new();
        for (pgno, data) in pages {
            self.check_page(pgno, data)?;
            if pgno <= db_size_pages {
                written.insert(pgno, page_hash(pgno, data));
            }
        }
        for (&pgno, &h) in &written {
            let old = if pgno <= n {
                self.hashes[pgno as usize - 1]
            } else {
                page_hash(pgno, &zero)
            };
            xor ^= old ^ h;
        }
        for pgno in n + 1..=db_size_pages {
            xor ^= page_hash(pgno, &zero);
        }
        Ok(xor)
    }

    fn check_page(&self, pgno: u32, data: &[u8]) -> Result<(), ChecksumError> {
        if pgno == 0 {
            return Err(ChecksumError::PageZero);
        }
        if data.len() != self.page_size as usize {
            return Err(ChecksumError::PageLength {
                pgno,
                len: data.len(),
                page_size: self.page_size,
            });
        }
        Ok(())
    }

    fn resize(&mut self, db_size_pages: u32) {
        let n = self.page_count();
        if db_size_pages < n {
            for h in self.hashes.drain(db_size_pages as usize..) {
                self.xor ^= h;
            }
        } else if db_size_pages > n {
            let zero = vec![0u8; self.page_size as usize];
            self.hashes.reserve((db_size_pages - n) as usize);
            for pgno in n + 1..=db_size_pages {
                self.push(pgno, &zero);
            }
        }
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use xxhash_rust::xxh3::xxh3_64;

    const PS: u32 = 512;

    #[test]
    fn page_hash_is_xxh3_of_be_pgno_and_bytes() {
        let page: Vec<u8> = (0..PS).map(|i| i as u8).collect();
        let mut buf = 7u32.to_be_bytes().to_vec();
        buf.extend_from_slice(&page);
        assert_eq!(page_hash(7, &page), xxh3_64(&buf));
        assert_ne!(page_hash(7, &page), page_hash(8, &page));
    }

    #[test]
    fn empty_db_and_shapes() {
        assert_eq!(db_checksum(&[], PS).unwrap(), 0);
        assert_eq!(
            db_checksum(&[0; 100], PS),
            Err(ChecksumError::PartialPage {
                len: 100,
                page_size: PS
            })
        );
        assert_eq!(PageHashes::new(1000), Err(ChecksumError::BadPageSize(1000)));
        let mut h = PageHashes::new(PS).unwrap();
        assert_eq!(
            h.apply([(0, &[0u8; 512][..])], 1),
            Err(ChecksumError::PageZero)
        );
        assert!(matches!(
            h.apply([(1, &[0u8; 10][..])], 1),
            Err(ChecksumError::PageLength {
                pgno: 1,
                len: 10,
                ..
            })
        ));
        // Failed applies changed nothing.
        assert_eq!(h.page_count(), 0);
    }

    #[test]
    fn from_reader_matches_from_bytes_and_rejects_partial() {
        let db: Vec<u8> = (0..PS * 5).map(|i| (i * 31 % 251) as u8).collect();
        let a = PageHashes::from_bytes(&db, PS).unwrap();
        let b = PageHashes::from_reader(&db[..], PS).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.page_count(), 5);
        assert!(PageHashes::from_reader(&db[..db.len() - 1], PS).is_err());
    }

    fn apply_to_image(img: &mut Vec<u8>, pages: &[(u32, Vec<u8>)], size: u32) {
        img.resize(size as usize * PS as usize, 0);
        for (p, d) in pages {
            if *p <= size {
                let o = (*p as usize - 1) * PS as usize;
                img[o..o + PS as usize].copy_from_slice(d);
            }
        }
    }

    /// Incremental value == full recomputation after random transactions that
    /// grow, shrink, rewrite, and write pages beyond the new size.
    #[test]
    fn incremental_equals_full_after_random_txns() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let mut img = Vec::new();
        let mut hashes = PageHashes::new(PS).unwrap();
        for round in 0..400 {
            let cur = hashes.page_count();
            let size = match rng.gen_range(0..10) {
                0 => rng.gen_range(0..=cur),         // shrink (maybe to 0)
                1 | 2 => cur + rng.gen_range(1..20), // grow, gaps count as zeros
                _ => cur.max(1),                     // same size
            };
            let n = rng.gen_range(0..8);
            let mut pages = Vec::new();
            for _ in 0..n {
                let p = rng.gen_range(1..=size + 3); // some beyond size: ignored
                let mut d = vec![0u8; PS as usize];
                rng.fill(&mut d[..]);
                pages.push((p, d));
            }
            let view: Vec<(u32, &[u8])> = pages.iter().map(|(p, d)| (*p, &d[..])).collect();
            let predicted = hashes.checksum_after(view.iter().copied(), size).unwrap();
            let got = hashes.apply(view.iter().copied(), size).unwrap();
            apply_to_image(&mut img, &pages, size);
            let full = PageHashes::from_bytes(&img, PS).unwrap();
            assert_eq!(got, full.checksum(), "round {round}");
            assert_eq!(predicted, got, "round {round}");
            assert_eq!(hashes, full, "round {round}");
        }
    }
}
