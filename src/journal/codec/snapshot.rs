//! Snapshots (docs/FORMAT.md): a whole database image in compressed frames
//! with an index and a footer; written and read a frame at a time
//! ([`SnapshotWriter`], [`SnapshotReader`]).

use super::*;

/// What the writer of a snapshot declares up front (it goes in the header,
/// which comes first) and [`SnapshotWriter::finish`] verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub db_name: String,
    pub node_id: String,
    pub txid: u64,
    pub epoch: u64,
    pub page_size: u32,
    pub page_count: u32,
    /// Whole-database checksum of the image (crate::sqlite::checksum).
    pub db_checksum: u64,
    pub timestamp_ms: i64,
}

/// A decoded snapshot header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub db_name: String,
    pub node_id: String,
    pub txid: u64,
    pub epoch: u64,
    pub page_size: u32,
    pub page_count: u32,
    pub pages_per_frame: u16,
    pub db_checksum: u64,
    pub timestamp_ms: i64,
    pub header_len: u32,
}

impl SnapshotHeader {
    /// Number of frames (groups of `pages_per_frame` pages).
    pub fn frame_count(&self) -> u32 {
        self.page_count.div_ceil(u32::from(self.pages_per_frame))
    }

    /// Length of the object's tail that holds the index and the footer;
    /// computable from the header alone, so it can be fetched with a suffix
    /// range request (`Range: bytes=-N`).
    pub fn index_suffix_len(&self) -> u64 {
        u64::from(self.frame_count()) * INDEX_ENTRY_LEN as u64 + SNAPSHOT_FOOTER_LEN as u64
    }

    /// Byte range of index + footer in an object of `object_len` bytes.
    pub fn index_range(&self, object_len: u64) -> Range<u64> {
        object_len.saturating_sub(self.index_suffix_len())..object_len
    }

    /// The frame holding page `pgno` and the page's slot in it.
    pub fn locate(&self, pgno: u32) -> Result<(u32, u32), CodecError> {
        if pgno == 0 || pgno > self.page_count {
            return Err(CodecError::PageOutOfRange {
                pgno,
                page_count: self.page_count,
            });
        }
        let g = u32::from(self.pages_per_frame);
        Ok(((pgno - 1) / g, (pgno - 1) % g))
    }

    /// Pages in frame `frame` (the last one may be short; 0 past the end).
    pub(super) fn pages_in_frame(&self, frame: u32) -> u32 {
        let g = u64::from(self.pages_per_frame);
        let first = u64::from(frame) * g;
        (u64::from(self.page_count).saturating_sub(first)).min(g) as u32
    }
}

/// Pages per frame: 64 KiB of uncompressed pages (16 pages of 4 KiB). See
/// docs/FORMAT.md for the trade-off.
pub fn default_pages_per_frame(page_size: u32) -> u16 {
    (65536 / page_size.max(1)).clamp(1, 256) as u16
}

/// One index entry: where a frame is and its CRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub offset: u64,
    pub len: u32,
    pub crc32: u32,
}

/// Writes everything through while computing the whole-file CRC.
pub(super) struct CrcWriter<W> {
    pub(super) inner: W,
    pub(super) crc: crc32fast::Hasher,
    pub(super) written: u64,
}

impl<W: Write> CrcWriter<W> {
    pub(super) fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.inner.write_all(b)?;
        self.crc.update(b);
        self.written += b.len() as u64;
        Ok(())
    }
}

/// Streams a database image into the snapshot format: pages go in one at a
/// time in page order and leave compressed in frames, so memory is one frame
/// plus 16 bytes of index per frame whatever the database size.
pub struct SnapshotWriter<W: Write> {
    out: CrcWriter<W>,
    header: SnapshotHeader,
    group: Vec<u8>,
    pages_written: u64,
    xor: u64,
    index: Vec<IndexEntry>,
    compressor: zstd::bulk::Compressor<'static>,
}

impl<W: Write> SnapshotWriter<W> {
    /// Validates `meta` and writes the header.
    pub fn new(out: W, meta: SnapshotMeta) -> Result<Self, CodecError> {
        if !is_valid_page_size(meta.page_size) {
            return Err(CodecError::BadPageSize(meta.page_size));
        }
        check_name(&meta.db_name, "database name", false)?;
        check_name(&meta.node_id, "node id", true)?;
        let ppf = default_pages_per_frame(meta.page_size);
        let mut h = Vec::with_capacity(SNAPSHOT_MAX_HEADER_LEN);
        h.extend_from_slice(SNAPSHOT_MAGIC);
        h.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&meta.page_size.to_be_bytes());
        h.extend_from_slice(&meta.txid.to_be_bytes());
        h.extend_from_slice(&meta.epoch.to_be_bytes());
        h.extend_from_slice(&meta.page_count.to_be_bytes());
        h.extend_from_slice(&ppf.to_be_bytes());
        h.extend_from_slice(&[0, 0]); // reserved
        h.extend_from_slice(&meta.db_checksum.to_be_bytes());
        h.extend_from_slice(&meta.timestamp_ms.to_be_bytes());
        debug_assert_eq!(h.len(), SNAP_FIXED);
        put_name(&mut h, &meta.db_name);
        put_name(&mut h, &meta.node_id);
        let h = finish_header(h);
        let mut out = CrcWriter {
            inner: out,
            crc: crc32fast::Hasher::new(),
            written: 0,
        };
        out.put(&h)?;
        let header = SnapshotHeader {
            db_name: meta.db_name,
            node_id: meta.node_id,
            txid: meta.txid,
            epoch: meta.epoch,
            page_size: meta.page_size,
            page_count: meta.page_count,
            pages_per_frame: ppf,
            db_checksum: meta.db_checksum,
            timestamp_ms: meta.timestamp_ms,
            header_len: h.len() as u32,
        };
        Ok(Self {
            out,
            group: Vec::with_capacity(ppf as usize * meta.page_size as usize),
            header,
            pages_written: 0,
            xor: 0,
            index: Vec::new(),
            compressor: zstd::bulk::Compressor::new(ZSTD_LEVEL)?,
        })
    }

    /// Appends the next page (page 1 first).
    pub fn write_page(&mut self, page: &[u8]) -> Result<(), CodecError> {
        let pgno = self.pages_written + 1;
        if pgno > u64::from(self.header.page_count) {
            return Err(CodecError::PageCountMismatch {
                declared: self.header.page_count,
                written: pgno,
            });
        }
        let pgno = pgno as u32;
        if page.len() != self.header.page_size as usize {
            return Err(CodecError::PageLength {
                txid: self.header.txid,
                pgno,
                len: page.len() as u64,
                page_size: self.header.page_size,
            });
        }
        self.xor ^= page_hash(pgno, page);
        self.group.extend_from_slice(page);
        self.pages_written += 1;
        if self.group.len() == self.group.capacity() || pgno == self.header.page_count {
            self.flush_frame()?;
        }
        Ok(())
    }

    pub(super) fn flush_frame(&mut self) -> Result<(), CodecError> {
        let frame = self.compressor.compress(&self.group)?;
        self.index.push(IndexEntry {
            offset: self.out.written,
            len: frame.len() as u32,
            crc32: crc32fast::hash(&frame),
        });
        self.out.put(&frame)?;
        self.group.clear();
        Ok(())
    }

    /// Writes index and footer after checking that exactly `page_count`
    /// pages came in and that their checksum is the declared one (a mismatch
    /// means the source changed while it was read). Returns the writer.
    pub fn finish(mut self) -> Result<W, CodecError> {
        if self.pages_written != u64::from(self.header.page_count) {
            return Err(CodecError::PageCountMismatch {
                declared: self.header.page_count,
                written: self.pages_written,
            });
        }
        if self.xor != self.header.db_checksum {
            return Err(CodecError::DbChecksum {
                stored: self.header.db_checksum,
                computed: self.xor,
            });
        }
        let index_offset = self.out.written;
        let mut idx = Vec::with_capacity(self.index.len() * INDEX_ENTRY_LEN);
        for e in &self.index {
            idx.extend_from_slice(&e.offset.to_be_bytes());
            idx.extend_from_slice(&e.len.to_be_bytes());
            idx.extend_from_slice(&e.crc32.to_be_bytes());
        }
        self.out.put(&idx)?;
        let mut footer = Vec::with_capacity(SNAPSHOT_FOOTER_LEN);
        footer.extend_from_slice(&index_offset.to_be_bytes());
        footer.extend_from_slice(&crc32fast::hash(&idx).to_be_bytes());
        footer.extend_from_slice(SNAPSHOT_END_MAGIC);
        self.out.put(&footer)?;
        let crc = self.out.crc.clone().finalize();
        self.out.inner.write_all(&crc.to_be_bytes())?;
        self.out.inner.flush()?;
        Ok(self.out.inner)
    }
}

/// Encodes a whole in-memory image (length a multiple of `meta.page_size`).
pub fn encode_snapshot(meta: SnapshotMeta, image: &[u8]) -> Result<Vec<u8>, CodecError> {
    let ps = meta.page_size as usize;
    if ps == 0 || !image.len().is_multiple_of(ps) {
        return Err(CodecError::BadPageSize(meta.page_size));
    }
    let mut w = SnapshotWriter::new(Vec::new(), meta)?;
    for page in image.chunks_exact(ps) {
        w.write_page(page)?;
    }
    w.finish()
}

/// Encodes the database file `image` into a snapshot file at `out` (created
/// or truncated), one page at a time: memory is one frame and the index,
/// whatever the database's size, and the bytes are those of
/// [`encode_snapshot`]. Returns the object's length.
pub fn encode_snapshot_file(
    meta: SnapshotMeta,
    image: &Path,
    out: &Path,
) -> Result<u64, CodecError> {
    let ps = meta.page_size as usize;
    let pages = meta.page_count;
    let mut src = io::BufReader::with_capacity(FILE_BUFFER, std::fs::File::open(image)?);
    let dst = io::BufWriter::with_capacity(FILE_BUFFER, std::fs::File::create(out)?);
    let mut w = SnapshotWriter::new(dst, meta)?;
    let mut page = vec![0u8; ps];
    for _ in 0..pages {
        src.read_exact(&mut page)?;
        w.write_page(&page)?;
    }
    let f = w.finish()?.into_inner().map_err(|e| e.into_error())?;
    Ok(f.metadata()?.len())
}

/// Buffer of each side of [`encode_snapshot_file`].
pub(super) const FILE_BUFFER: usize = 1 << 20;

/// Random access to a snapshot through range reads: parse the header from a
/// prefix, the index from the suffix, then fetch and decode single frames.
#[derive(Debug, Clone)]
pub struct SnapshotReader {
    header: SnapshotHeader,
    index: Vec<IndexEntry>,
    index_offset: u64,
}

impl SnapshotReader {
    /// Parses and verifies the header from a prefix of the object
    /// ([`SNAPSHOT_MAX_HEADER_LEN`] bytes always suffice).
    pub fn parse_header(bytes: &[u8]) -> Result<SnapshotHeader, CodecError> {
        let h = verified_header(bytes, SNAPSHOT_MAGIC, SNAP_FIXED, "snapshot header")?;
        let (db_name, node_id) = read_names(h, SNAP_FIXED)?;
        let hdr = SnapshotHeader {
            db_name,
            node_id,
            page_size: be32(h, 12),
            txid: be64(h, 16),
            epoch: be64(h, 24),
            page_count: be32(h, 32),
            pages_per_frame: be16(h, 36),
            db_checksum: be64(h, 40),
            timestamp_ms: be64(h, 48) as i64,
            header_len: h.len() as u32,
        };
        if !is_valid_page_size(hdr.page_size) {
            return Err(CodecError::BadPageSize(hdr.page_size));
        }
        if be16(h, 38) != 0 {
            return Err(CodecError::BadHeader("reserved field is not zero"));
        }
        let raw = u64::from(hdr.pages_per_frame) * u64::from(hdr.page_size);
        if hdr.pages_per_frame == 0 || raw > MAX_FRAME_RAW_LEN {
            return Err(CodecError::BadHeader("pages per frame out of range"));
        }
        Ok(hdr)
    }

    /// Builds a reader from the header and the object's last
    /// [`SnapshotHeader::index_suffix_len`] bytes (index + footer), verifying
    /// the footer, the index CRC and that the frames tile the object.
    pub fn new(header: SnapshotHeader, suffix: &[u8]) -> Result<Self, CodecError> {
        let want = header.index_suffix_len();
        if (suffix.len() as u64) < want {
            return Err(CodecError::Truncated {
                what: "snapshot index",
                needed: want,
                available: suffix.len() as u64,
            });
        }
        let suffix = &suffix[suffix.len() - want as usize..];
        let (idx, footer) = suffix.split_at(suffix.len() - SNAPSHOT_FOOTER_LEN);
        if &footer[12..20] != SNAPSHOT_END_MAGIC {
            return Err(CodecError::BadMagic {
                what: "snapshot footer",
                expected: "MBSNPEND",
                found: footer[12..20].to_vec(),
            });
        }
        let index_offset = be64(footer, 0);
        let stored = be32(footer, 8);
        let computed = crc32fast::hash(idx);
        if stored != computed {
            return Err(CodecError::Checksum {
                region: Region::Index,
                stored,
                computed,
            });
        }
        let mut index = Vec::with_capacity(header.frame_count() as usize);
        let mut expect = u64::from(header.header_len);
        for e in idx.chunks_exact(INDEX_ENTRY_LEN) {
            let entry = IndexEntry {
                offset: be64(e, 0),
                len: be32(e, 8),
                crc32: be32(e, 12),
            };
            if entry.offset != expect || entry.len == 0 {
                return Err(CodecError::BadIndex("its entries do not tile the frames"));
            }
            expect = entry.offset + u64::from(entry.len);
            index.push(entry);
        }
        if expect != index_offset {
            return Err(CodecError::BadIndex(
                "the frames it lists do not end where the footer says it starts",
            ));
        }
        Ok(Self {
            header,
            index,
            index_offset,
        })
    }

    /// Parses a whole object held in memory (header, index, footer; the frames
    /// are verified when decoded).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CodecError> {
        let header = Self::parse_header(bytes)?;
        let r = Self::new(header, bytes)?;
        let expected = r.object_len();
        if bytes.len() as u64 != expected {
            return Err(CodecError::LengthMismatch {
                expected,
                actual: bytes.len() as u64,
            });
        }
        Ok(r)
    }

    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    pub fn index(&self) -> &[IndexEntry] {
        &self.index
    }

    /// Total object length: frames end at the index, then index + footer.
    pub fn object_len(&self) -> u64 {
        self.index_offset + self.header.index_suffix_len()
    }

    /// `(offset, length)` of the frame that holds page `pgno`: one range read
    /// fetches it.
    pub fn page_range(&self, pgno: u32) -> Result<(u64, u32), CodecError> {
        let (frame, _) = self.header.locate(pgno)?;
        let e = self.index[frame as usize];
        Ok((e.offset, e.len))
    }

    /// Verifies and decompresses frame `frame`; returns its pages.
    pub fn decode_frame(&self, frame: u32, frame_bytes: &[u8]) -> Result<Vec<Bytes>, CodecError> {
        let e = *self
            .index
            .get(frame as usize)
            .ok_or(CodecError::PageOutOfRange {
                pgno: frame
                    .saturating_mul(u32::from(self.header.pages_per_frame))
                    .saturating_add(1),
                page_count: self.header.page_count,
            })?;
        if frame_bytes.len() != e.len as usize {
            return Err(CodecError::FrameLength {
                frame,
                expected: u64::from(e.len),
                actual: frame_bytes.len() as u64,
            });
        }
        let computed = crc32fast::hash(frame_bytes);
        if computed != e.crc32 {
            return Err(CodecError::Checksum {
                region: Region::Frame(frame),
                stored: e.crc32,
                computed,
            });
        }
        let ps = self.header.page_size as usize;
        let n = self.header.pages_in_frame(frame) as usize;
        let want = n * ps;
        // Capacity bounded by the header check (<= MAX_FRAME_RAW_LEN).
        let raw = zstd::bulk::decompress(frame_bytes, want)
            .map_err(|e| decompress_err(Region::Frame(frame), e))?;
        if raw.len() != want {
            return Err(CodecError::Decompress {
                region: Region::Frame(frame),
                detail: format!("{} bytes, expected {want}", raw.len()),
            });
        }
        let raw = Bytes::from(raw);
        Ok((0..n).map(|i| raw.slice(i * ps..(i + 1) * ps)).collect())
    }

    /// Verifies and decodes the frame fetched with [`SnapshotReader::page_range`]
    /// and returns page `pgno`.
    pub fn decode_page(&self, frame_bytes: &[u8], pgno: u32) -> Result<Bytes, CodecError> {
        let (frame, slot) = self.header.locate(pgno)?;
        let pages = self.decode_frame(frame, frame_bytes)?;
        Ok(pages[slot as usize].clone())
    }

    /// Verifies a whole object (header, index, every frame, whole-database
    /// checksum, whole-file CRC) while writing the database image to `out`.
    pub fn restore_to<W: Write>(bytes: &[u8], mut out: W) -> Result<SnapshotHeader, CodecError> {
        let r = Self::from_bytes(bytes)?;
        let mut xor = 0u64;
        let mut pgno = 1u32;
        for (k, e) in r.index.iter().enumerate() {
            let s = e.offset as usize;
            let frame = &bytes[s..s + e.len as usize];
            for page in r.decode_frame(k as u32, frame)? {
                xor ^= page_hash(pgno, &page);
                out.write_all(&page)?;
                pgno += 1;
            }
        }
        if xor != r.header.db_checksum {
            return Err(CodecError::DbChecksum {
                stored: r.header.db_checksum,
                computed: xor,
            });
        }
        let end = bytes.len() - 4;
        let stored = be32(bytes, end);
        let computed = crc32fast::hash(&bytes[..end]);
        if stored != computed {
            return Err(CodecError::Checksum {
                region: Region::File,
                stored,
                computed,
            });
        }
        out.flush()?;
        Ok(r.header)
    }
}

/// Fully decodes and verifies a snapshot held in memory; returns its header
/// and the database image.
pub fn decode_snapshot(bytes: &[u8]) -> Result<(SnapshotHeader, Vec<u8>), CodecError> {
    let mut image = Vec::new();
    let h = SnapshotReader::restore_to(bytes, &mut image)?;
    Ok((h, image))
}
