//! Segments (docs/FORMAT.md): a run of transactions of one database, one
//! zstd-compressed body after a verified header; encoded whole, decoded as a
//! stream ([`SegmentReader`]).

use super::*;

/// What the writer of a segment says about it; the rest of the header is
/// derived from the transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentMeta {
    pub db_name: String,
    pub node_id: String,
    pub page_size: u32,
    pub created_ms: i64,
}

/// A decoded segment header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub db_name: String,
    pub node_id: String,
    pub page_size: u32,
    /// Epoch of the last transaction (the highest in the segment).
    pub epoch: u64,
    pub txid_from: u64,
    pub txid_to: u64,
    /// Pre-checksum of `txid_from`, post-checksum of `txid_to`.
    pub pre_checksum: u64,
    pub post_checksum: u64,
    pub created_ms: i64,
    pub txn_count: u32,
    pub page_total: u64,
    pub header_len: u32,
    pub body_len: u64,
    pub raw_len: u64,
}

impl SegmentHeader {
    /// Total object length implied by the header (saturating: `body_len` is
    /// read from the object, and a huge one must read as a length mismatch,
    /// not overflow).
    pub fn object_len(&self) -> u64 {
        u64::from(self.header_len)
            .saturating_add(self.body_len)
            .saturating_add(4)
    }

    /// Checks that this segment continues a chain whose last transaction is
    /// `prev_txid` with post-checksum `prev_checksum` (a previous segment's
    /// `txid_to`/`post_checksum`, or a snapshot's `txid`/`db_checksum`).
    pub fn check_follows(&self, prev_txid: u64, prev_checksum: u64) -> Result<(), CodecError> {
        let expected = prev_txid.wrapping_add(1);
        if self.txid_from != expected {
            return Err(CodecError::ChainGap {
                expected,
                found: self.txid_from,
            });
        }
        if self.pre_checksum != prev_checksum {
            return Err(CodecError::ChecksumChain {
                txid: self.txid_from,
                expected: prev_checksum,
                found: self.pre_checksum,
            });
        }
        Ok(())
    }
}

/// A fully decoded segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub header: SegmentHeader,
    pub txns: Vec<Txn>,
}

/// Encodes `txns` (consecutive, chained, non-empty) as a segment object.
pub fn encode_segment(meta: &SegmentMeta, txns: &[Txn]) -> Result<Vec<u8>, CodecError> {
    if !is_valid_page_size(meta.page_size) {
        return Err(CodecError::BadPageSize(meta.page_size));
    }
    check_name(&meta.db_name, "database name", false)?;
    check_name(&meta.node_id, "node id", true)?;
    check_sequence(txns, meta.page_size)?;
    let pages: usize = txns.iter().map(|t| t.pages.len()).sum();
    if txns.len() > u32::MAX as usize || pages > u32::MAX as usize {
        return Err(CodecError::BadHeader(
            "too many transactions or pages for one segment",
        ));
    }
    encode_segment_unchecked(meta, txns)
}

/// The encoder proper, without validation (tests use it to build well-formed
/// objects with invalid content).
pub(super) fn encode_segment_unchecked(
    meta: &SegmentMeta,
    txns: &[Txn],
) -> Result<Vec<u8>, CodecError> {
    let first = txns.first().ok_or(CodecError::EmptySegment)?;
    let last = txns.last().unwrap();
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
    enc.include_checksum(false)?;
    let mut raw_len = 0u64;
    let mut page_total = 0u64;
    for t in txns {
        let mut head = [0u8; TXN_HEAD_LEN];
        head[0..8].copy_from_slice(&t.txid.to_be_bytes());
        head[8..16].copy_from_slice(&t.epoch.to_be_bytes());
        head[16..20].copy_from_slice(&t.db_size_pages.to_be_bytes());
        head[20..28].copy_from_slice(&t.pre_checksum.to_be_bytes());
        head[28..36].copy_from_slice(&t.post_checksum.to_be_bytes());
        head[36..44].copy_from_slice(&t.timestamp_ms.to_be_bytes());
        head[44..48].copy_from_slice(&(t.pages.len() as u32).to_be_bytes());
        enc.write_all(&head)?;
        raw_len += TXN_HEAD_LEN as u64;
        for (pgno, data) in &t.pages {
            let mut ph = [0u8; PAGE_HEAD_LEN];
            ph[0..4].copy_from_slice(&pgno.to_be_bytes());
            ph[4..8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            enc.write_all(&ph)?;
            enc.write_all(data)?;
            raw_len += (PAGE_HEAD_LEN + data.len()) as u64;
        }
        page_total += t.pages.len() as u64;
    }
    let body = enc.finish()?;

    let mut h = Vec::with_capacity(SEGMENT_MAX_HEADER_LEN);
    h.extend_from_slice(SEGMENT_MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    h.extend_from_slice(&[0, 0]); // header length, set by finish_header
    h.extend_from_slice(&meta.page_size.to_be_bytes());
    h.extend_from_slice(&last.epoch.to_be_bytes());
    h.extend_from_slice(&first.txid.to_be_bytes());
    h.extend_from_slice(&last.txid.to_be_bytes());
    h.extend_from_slice(&first.pre_checksum.to_be_bytes());
    h.extend_from_slice(&last.post_checksum.to_be_bytes());
    h.extend_from_slice(&meta.created_ms.to_be_bytes());
    h.extend_from_slice(&(txns.len() as u32).to_be_bytes());
    h.extend_from_slice(&(page_total as u32).to_be_bytes());
    h.extend_from_slice(&(body.len() as u64).to_be_bytes());
    h.extend_from_slice(&raw_len.to_be_bytes());
    debug_assert_eq!(h.len(), SEG_FIXED);
    put_name(&mut h, &meta.db_name);
    put_name(&mut h, &meta.node_id);
    let mut out = finish_header(h);
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    Ok(out)
}

/// Parses and verifies a segment header from a prefix of the object
/// ([`SEGMENT_MAX_HEADER_LEN`] bytes always suffice). Does not look at the
/// body.
pub fn parse_segment_header(bytes: &[u8]) -> Result<SegmentHeader, CodecError> {
    let h = verified_header(bytes, SEGMENT_MAGIC, SEG_FIXED, "segment header")?;
    let (db_name, node_id) = read_names(h, SEG_FIXED)?;
    let hdr = SegmentHeader {
        db_name,
        node_id,
        page_size: be32(h, 12),
        epoch: be64(h, 16),
        txid_from: be64(h, 24),
        txid_to: be64(h, 32),
        pre_checksum: be64(h, 40),
        post_checksum: be64(h, 48),
        created_ms: be64(h, 56) as i64,
        txn_count: be32(h, 64),
        page_total: u64::from(be32(h, 68)),
        body_len: be64(h, 72),
        raw_len: be64(h, 80),
        header_len: h.len() as u32,
    };
    if !is_valid_page_size(hdr.page_size) {
        return Err(CodecError::BadPageSize(hdr.page_size));
    }
    if hdr.txn_count == 0 {
        return Err(CodecError::EmptySegment);
    }
    let span = hdr
        .txid_to
        .checked_sub(hdr.txid_from)
        .and_then(|d| d.checked_add(1));
    if span != Some(u64::from(hdr.txn_count)) {
        return Err(CodecError::BadHeader(
            "txid range does not match the transaction count",
        ));
    }
    if hdr.raw_len > MAX_SEGMENT_RAW_LEN {
        return Err(CodecError::BadHeader("uncompressed body too large"));
    }
    Ok(hdr)
}

/// Decodes and verifies a whole segment: header, length, whole-file CRC, then
/// every transaction and the agreement between header and body.
pub fn decode_segment(bytes: &[u8]) -> Result<Segment, CodecError> {
    let mut r = SegmentReader::new(bytes)?;
    let mut txns = Vec::new();
    for t in &mut r {
        txns.push(t?);
    }
    let header = r.finish()?;
    Ok(Segment { header, txns })
}

/// Counts bytes read through it.
pub(super) struct Counting<R> {
    pub(super) inner: R,
    pub(super) n: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

/// The decompressor, limited to the declared `raw_len` so that a lying header
/// or a decompression bomb cannot make the reader produce more than that.
pub(super) type BodyDecoder<'a> = io::Take<zstd::stream::read::Decoder<'a, &'a [u8]>>;

/// Streaming segment decoder: verifies the header and the whole-file CRC up
/// front, then yields transactions one at a time (so restore can stop at any
/// txid and memory stays at one transaction). Call [`SegmentReader::finish`]
/// after the last one to check that header and body agree to the end.
pub struct SegmentReader<'a> {
    header: SegmentHeader,
    body: Counting<BodyDecoder<'a>>,
    index: u64,
    prev: Option<Txn>,
    pages_seen: u64,
    failed: bool,
}

impl<'a> SegmentReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Result<Self, CodecError> {
        let header = parse_segment_header(bytes)?;
        let expected = header.object_len();
        if bytes.len() as u64 != expected {
            return Err(CodecError::LengthMismatch {
                expected,
                actual: bytes.len() as u64,
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
        let body = &bytes[header.header_len as usize..end];
        let mut dec = zstd::stream::read::Decoder::with_buffer(body)
            .map_err(|e| decompress_err(Region::Body, e))?;
        dec.window_log_max(MAX_WINDOW_LOG)
            .map_err(|e| decompress_err(Region::Body, e))?;
        let dec = dec.single_frame().take(header.raw_len);
        Ok(Self {
            header,
            body: Counting { inner: dec, n: 0 },
            index: 0,
            prev: None,
            pages_seen: 0,
            failed: false,
        })
    }

    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    pub(super) fn read_exact(
        &mut self,
        buf: &mut [u8],
        what: &'static str,
    ) -> Result<(), CodecError> {
        let before = self.body.n;
        match self.body.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(CodecError::Truncated {
                what,
                needed: before + buf.len() as u64,
                available: self.body.n,
            }),
            Err(e) => Err(decompress_err(Region::Body, e)),
        }
    }

    pub(super) fn next_txn(&mut self) -> Result<Txn, CodecError> {
        let mut head = [0u8; TXN_HEAD_LEN];
        self.read_exact(&mut head, "segment body")?;
        let txid = be64(&head, 0);
        let epoch = be64(&head, 8);
        let db_size_pages = be32(&head, 16);
        let pre_checksum = be64(&head, 20);
        let post_checksum = be64(&head, 28);
        let timestamp_ms = be64(&head, 36) as i64;
        let count = be32(&head, 44);
        let ps = self.header.page_size;
        let mut t = Txn {
            txid,
            epoch,
            db_size_pages,
            pre_checksum,
            post_checksum,
            timestamp_ms,
            pages: Vec::new(),
        };
        // Check the links before reading pages: a wrong txid is a more
        // precise error than whatever its pages would produce.
        match &self.prev {
            None => {
                if txid != self.header.txid_from {
                    return Err(CodecError::TxidNotConsecutive {
                        index: 0,
                        expected: self.header.txid_from,
                        found: txid,
                    });
                }
                if pre_checksum != self.header.pre_checksum {
                    return Err(CodecError::HeaderBodyMismatch {
                        field: "pre_checksum",
                        header: self.header.pre_checksum,
                        body: pre_checksum,
                    });
                }
            }
            Some(p) => check_link(self.index, self.header.txid_from, p, &t)?,
        }
        if epoch > self.header.epoch {
            return Err(CodecError::HeaderBodyMismatch {
                field: "epoch",
                header: self.header.epoch,
                body: epoch,
            });
        }
        let mut prev = 0u32;
        for _ in 0..count {
            let mut ph = [0u8; PAGE_HEAD_LEN];
            self.read_exact(&mut ph, "segment body")?;
            let pgno = be32(&ph, 0);
            let len = be32(&ph, 4);
            check_page(txid, pgno, u64::from(len), prev, db_size_pages, ps)?;
            let mut data = vec![0u8; ps as usize];
            self.read_exact(&mut data, "segment body")?;
            t.pages.push((pgno, Bytes::from(data)));
            prev = pgno;
        }
        self.pages_seen += u64::from(count);
        if self.pages_seen > self.header.page_total {
            return Err(CodecError::HeaderBodyMismatch {
                field: "page_total",
                header: self.header.page_total,
                body: self.pages_seen,
            });
        }
        Ok(t)
    }

    /// Checks what the body's end must agree on: transaction and page counts,
    /// last epoch and post-checksum, uncompressed length, nothing after the
    /// compressed frame. Returns the header.
    pub fn finish(mut self) -> Result<SegmentHeader, CodecError> {
        // Drain any transactions the caller did not read.
        while self.index < u64::from(self.header.txn_count) {
            match self.next() {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        // Extra data first: "more transactions than the header says" is the
        // most precise description of a body that goes on.
        let mut probe = [0u8; 1];
        let extra = self
            .body
            .inner
            .get_mut()
            .read(&mut probe)
            .map_err(|e| decompress_err(Region::Body, e))?;
        if extra != 0 {
            return Err(CodecError::BodyContinues {
                txn_count: self.header.txn_count,
            });
        }
        if self.body.n != self.header.raw_len {
            return Err(CodecError::HeaderBodyMismatch {
                field: "raw_len",
                header: self.header.raw_len,
                body: self.body.n,
            });
        }
        let h = &self.header;
        let last = self.prev.as_ref().ok_or(CodecError::EmptySegment)?;
        if last.post_checksum != h.post_checksum {
            return Err(CodecError::HeaderBodyMismatch {
                field: "post_checksum",
                header: h.post_checksum,
                body: last.post_checksum,
            });
        }
        if last.epoch != h.epoch {
            return Err(CodecError::HeaderBodyMismatch {
                field: "epoch",
                header: h.epoch,
                body: last.epoch,
            });
        }
        if self.pages_seen != h.page_total {
            return Err(CodecError::HeaderBodyMismatch {
                field: "page_total",
                header: h.page_total,
                body: self.pages_seen,
            });
        }
        let header = self.header.clone();
        let rest = self.body.inner.into_inner().finish();
        if !rest.is_empty() {
            return Err(CodecError::TrailingBytes {
                what: "segment body",
            });
        }
        Ok(header)
    }
}

impl Iterator for SegmentReader<'_> {
    type Item = Result<Txn, CodecError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.index >= u64::from(self.header.txn_count) {
            return None;
        }
        if self.body.n >= self.header.raw_len {
            self.failed = true;
            return Some(Err(CodecError::HeaderBodyMismatch {
                field: "txn_count",
                header: u64::from(self.header.txn_count),
                body: self.index,
            }));
        }
        match self.next_txn() {
            Ok(t) => {
                self.index += 1;
                self.prev = Some(t.clone());
                Some(Ok(t))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

pub(super) fn decompress_err(region: Region, e: io::Error) -> CodecError {
    CodecError::Decompress {
        region,
        detail: e.to_string(),
    }
}
