//! WAL file parsing and incremental commit capture ([`WalTracker`]).
//!
//! Layout (walformat.html, wal.c; all header integers big-endian):
//!
//! ```text
//! WAL header, 32 bytes            frame = 24-byte header + page
//!  0 magic 0x377f0682 | 0x377f0683  0 page number
//!  4 format version 3007000          4 db size in pages after commit (0 = not a commit)
//!  8 page size (65536 stored as is)  8 salt-1   (copy of the header's)
//! 12 checkpoint sequence            12 salt-2
//! 16 salt-1                         16 checksum-1 (cumulative)
//! 20 salt-2                         20 checksum-2
//! 24 checksum-1 over bytes 0..24
//! 28 checksum-2
//! ```
//!
//! The checksum is SQLite's `walChecksumBytes`: the data is read as 32-bit
//! words, in big-endian order when the magic's low bit is set and in
//! little-endian order when it is clear (SQLite writes `0x377f0682 |
//! SQLITE_BIGENDIAN`, so x86 and ARM little-endian hosts write 0x377f0682);
//! for each pair of words `s1 += w0 + s2; s2 += w1 + s1` with wrapping adds.
//! The header's checksum starts from (0, 0); frame 1 starts from the header's
//! checksum and every later frame from its predecessor's, covering the first
//! 8 bytes of the frame header and then the page.

use std::collections::BTreeMap;
use std::io;

use bytes::Bytes;
use thiserror::Error;

use super::header::is_valid_page_size;

pub const WAL_HEADER_LEN: usize = 32;
pub const FRAME_HEADER_LEN: usize = 24;
/// Magic with little-endian checksum words (what little-endian hosts write).
pub const MAGIC_LE: u32 = 0x377f_0682;
/// Magic with big-endian checksum words.
pub const MAGIC_BE: u32 = 0x377f_0683;
/// The only WAL format version SQLite has ever written.
pub const FORMAT_VERSION: u32 = 3_007_000;

/// Why a WAL header is not usable. Frames are never "errors": an invalid frame
/// simply ends the log, as in SQLite.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WalHeaderError {
    #[error("WAL header needs 32 bytes, got {0}")]
    TooShort(usize),
    #[error("bad WAL magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported WAL format version {0}")]
    BadVersion(u32),
    #[error("invalid WAL page size {0}")]
    BadPageSize(u32),
    #[error("WAL header checksum mismatch")]
    BadChecksum,
}

/// The cumulative checksum state `(s1, s2)`.
pub type Cksum = (u32, u32);

/// SQLite's `walChecksumBytes` over `data` (length a multiple of 8), starting
/// from `init`. `big_endian` is the magic's low bit.
pub fn wal_checksum(big_endian: bool, data: &[u8], init: Cksum) -> Cksum {
    debug_assert!(data.len().is_multiple_of(8));
    let (mut s1, mut s2) = init;
    let word = if big_endian {
        u32::from_be_bytes
    } else {
        u32::from_le_bytes
    };
    for pair in data.chunks_exact(8) {
        let w0 = word([pair[0], pair[1], pair[2], pair[3]]);
        let w1 = word([pair[4], pair[5], pair[6], pair[7]]);
        s1 = s1.wrapping_add(w0).wrapping_add(s2);
        s2 = s2.wrapping_add(w1).wrapping_add(s1);
    }
    (s1, s2)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The 32-byte WAL header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    pub magic: u32,
    pub version: u32,
    pub page_size: u32,
    pub checkpoint_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub checksum: Cksum,
}

impl WalHeader {
    /// Builds a header with a correct checksum (for tools and tests).
    pub fn new(
        page_size: u32,
        checkpoint_seq: u32,
        salt1: u32,
        salt2: u32,
        big_endian: bool,
    ) -> Self {
        let mut h = Self {
            magic: if big_endian { MAGIC_BE } else { MAGIC_LE },
            version: FORMAT_VERSION,
            page_size,
            checkpoint_seq,
            salt1,
            salt2,
            checksum: (0, 0),
        };
        let b = h.encode();
        h.checksum = wal_checksum(big_endian, &b[..24], (0, 0));
        h
    }

    /// Parses and validates (magic, version, page size, header checksum) the
    /// way SQLite's recovery does.
    pub fn parse(b: &[u8]) -> Result<Self, WalHeaderError> {
        if b.len() < WAL_HEADER_LEN {
            return Err(WalHeaderError::TooShort(b.len()));
        }
        let h = Self {
            magic: be32(b, 0),
            version: be32(b, 4),
            page_size: be32(b, 8),
            checkpoint_seq: be32(b, 12),
            salt1: be32(b, 16),
            salt2: be32(b, 20),
            checksum: (be32(b, 24), be32(b, 28)),
        };
        if h.magic & !1 != MAGIC_LE {
            return Err(WalHeaderError::BadMagic(h.magic));
        }
        if h.version != FORMAT_VERSION {
            return Err(WalHeaderError::BadVersion(h.version));
        }
        if !is_valid_page_size(h.page_size) {
            return Err(WalHeaderError::BadPageSize(h.page_size));
        }
        if wal_checksum(h.big_endian(), &b[..24], (0, 0)) != h.checksum {
            return Err(WalHeaderError::BadChecksum);
        }
        Ok(h)
    }

    pub fn encode(&self) -> [u8; WAL_HEADER_LEN] {
        let mut b = [0u8; WAL_HEADER_LEN];
        for (i, v) in [
            self.magic,
            self.version,
            self.page_size,
            self.checkpoint_seq,
            self.salt1,
            self.salt2,
            self.checksum.0,
            self.checksum.1,
        ]
        .into_iter()
        .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    /// True when checksum words are big-endian (magic 0x377f0683).
    pub fn big_endian(&self) -> bool {
        self.magic & 1 == 1
    }

    pub fn frame_size(&self) -> u64 {
        frame_size(self.page_size)
    }

    /// Byte offset of frame `n` (1-based, as in wal.c).
    pub fn frame_offset(&self, n: u32) -> u64 {
        WAL_HEADER_LEN as u64 + u64::from(n.saturating_sub(1)) * self.frame_size()
    }
}

/// Size of one frame (header + page).
pub fn frame_size(page_size: u32) -> u64 {
    FRAME_HEADER_LEN as u64 + u64::from(page_size)
}

/// The 24-byte frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub pgno: u32,
    /// Database size in pages after the commit; 0 when not a commit frame.
    pub db_size_after_commit: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub checksum: Cksum,
}

impl FrameHeader {
    /// Decodes the fields; validity is checked by the tracker (salts,
    /// cumulative checksum), never here.
    pub fn parse(b: &[u8; FRAME_HEADER_LEN]) -> Self {
        Self {
            pgno: be32(b, 0),
            db_size_after_commit: be32(b, 4),
            salt1: be32(b, 8),
            salt2: be32(b, 12),
            checksum: (be32(b, 16), be32(b, 20)),
        }
    }

    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        for (i, v) in [
            self.pgno,
            self.db_size_after_commit,
            self.salt1,
            self.salt2,
            self.checksum.0,
            self.checksum.1,
        ]
        .into_iter()
        .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    pub fn is_commit(&self) -> bool {
        self.db_size_after_commit != 0
    }
}

/// Encodes a valid frame chained after `prev` (the header's checksum for the
/// first frame). Returns the frame bytes and the new chain value. For tools
/// and tests: membridge never writes WAL files in production.
pub fn encode_frame(
    hdr: &WalHeader,
    prev: Cksum,
    pgno: u32,
    db_size_after_commit: u32,
    page: &[u8],
) -> (Vec<u8>, Cksum) {
    assert_eq!(page.len(), hdr.page_size as usize, "page size");
    let mut fh = FrameHeader {
        pgno,
        db_size_after_commit,
        salt1: hdr.salt1,
        salt2: hdr.salt2,
        checksum: (0, 0),
    };
    let head = fh.encode();
    let c = wal_checksum(hdr.big_endian(), &head[..8], prev);
    let c = wal_checksum(hdr.big_endian(), page, c);
    fh.checksum = c;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + page.len());
    out.extend_from_slice(&fh.encode());
    out.extend_from_slice(page);
    (out, c)
}

/// True if a write of `len` bytes at `offset` of a WAL with `page_size` covers
/// the last byte of the WAL header, of a frame header or of a frame. SQLite
/// completes every frame with a write ending exactly there (it writes the
/// 24-byte header, then the page; and when it rewrites checksums at commit it
/// rewrites headers only), so other writes cannot complete a frame and need
/// no scan. Pure arithmetic, no I/O.
pub fn write_may_complete_frame(offset: u64, len: u64, page_size: u32) -> bool {
    if len == 0 {
        return false;
    }
    let end = offset.saturating_add(len); // exclusive
    let h = WAL_HEADER_LEN as u64;
    if offset < h && end >= h {
        return true; // covers byte 31, the end of the WAL header
    }
    if end <= h {
        return false;
    }
    let fs = frame_size(page_size);
    let a = offset.max(h) - h;
    let b = end - h;
    let covers = |r: u64| a + (r + fs - a % fs) % fs < b;
    covers(FRAME_HEADER_LEN as u64 - 1) || covers(fs - 1)
}

/// Positional reads from the backing file (`pread`), plus its current size.
pub trait ReadAt {
    /// Reads up to `buf.len()` bytes at `offset`; returns the count, 0 at EOF.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Current length of the file.
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        let src = self.get(start..).unwrap_or(&[]);
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        Ok(n)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.as_slice().read_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        (**self).read_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
}

/// Reads until `buf` is full or EOF; returns the count.
fn read_full_at<R: ReadAt + ?Sized>(r: &R, buf: &mut [u8], mut offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read_at(&mut buf[got..], offset) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// One committed WAL transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalTxn {
    /// Last image of each page written by the transaction, pages above
    /// `db_size_pages` removed (SQLite ignores them too).
    pub pages: BTreeMap<u32, Bytes>,
    /// Database size in pages after the commit (never 0).
    pub db_size_pages: u32,
    pub page_size: u32,
    /// Identity of the WAL cycle the frames belong to.
    pub salt1: u32,
    pub salt2: u32,
    pub checkpoint_seq: u32,
    /// 1-based frame numbers of the first frame and of the commit frame.
    pub first_frame: u32,
    pub commit_frame: u32,
}

/// Counters for diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStats {
    pub txns: u64,
    pub frames: u64,
    /// New WAL headers seen (first one included).
    pub cycles: u64,
    /// Truncations below the scan position.
    pub truncations: u64,
    /// Times the position moved back because already-scanned, uncommitted
    /// frames were overwritten.
    pub rewinds: u64,
    /// Commit frames skipped as sector padding (see [`WalTracker`]).
    pub padding_frames: u64,
}

#[derive(Clone)]
struct Pending {
    pgno: u32,
    data: Bytes,
    /// Chain value after this frame.
    cksum: Cksum,
}

#[derive(Clone)]
struct LastCommit {
    pgno: u32,
    db_size: u32,
    data: Bytes,
}

/// Where a cycle stood before the commit it emitted last: enough to take
/// that commit back ([`WalTracker::undo_last`]).
#[derive(Clone)]
struct Undo {
    commit_end: u64,
    commit_cksum: Cksum,
    last_commit: Option<LastCommit>,
}

/// The state of one WAL cycle (one header / salt pair).
#[derive(Clone)]
struct Cycle {
    raw: [u8; WAL_HEADER_LEN],
    hdr: WalHeader,
    /// Offset just past the last valid commit frame (32 when none).
    commit_end: u64,
    commit_cksum: Cksum,
    /// Valid frames after the last commit, in file order.
    pending: Vec<Pending>,
    last_commit: Option<LastCommit>,
    undo: Option<Undo>,
}

#[derive(Clone)]
enum State {
    /// No valid header seen yet: the next valid header starts a cycle at frame 1.
    Empty,
    Active(Cycle),
    /// The cycle with this header lost frames already emitted (truncated
    /// below them); ignore it until the header changes, so that nothing is
    /// emitted twice.
    Retired([u8; WAL_HEADER_LEN]),
}

/// Incremental capture of committed transactions from a `-wal` file.
///
/// The FUSE write path owns one tracker per replicated database and, for every
/// write to `<db>-wal` *after it reached the backing file*:
///
/// ```text
/// if tracker.note_write(offset, len) { for txn in tracker.scan(&backing_wal)? { capture(txn) } }
/// ```
///
/// and for a truncate, `tracker.note_truncate(new_len)` (scan detects it too).
/// On unlink or re-creation of the `-wal`, call [`WalTracker::reset_to_start`].
///
/// **Invariant.** SQLite cannot overwrite a WAL byte before the filesystem has
/// seen it, and a transaction is committed (visible to readers) only after
/// its commit frame has been written in full. Scanning after every write that
/// may complete a frame therefore sees every commit frame while it is valid,
/// so no transaction is missed, and positions only move forward within a
/// cycle, so none is emitted twice. This needs write-through I/O on `-wal`
/// (no FUSE writeback cache), so that each SQLite write reaches the daemon
/// before the next one.
///
/// What the tracker handles:
/// - frames written as two writes (header, then page), half-written frames:
///   the scan stops at the first invalid or incomplete frame and resumes there;
/// - uncommitted frames rewritten in place: when a transaction spills pages
///   and then rewrites one of them, or is rolled back and the next transaction
///   reuses its frames, SQLite overwrites frames the tracker already read, and
///   at commit rewrites their checksums. [`WalTracker::note_write`] sees the
///   write below the scan position and rewinds to the overwritten frame, so the
///   final images are read again;
/// - WAL reset (new header at offset 0, new salts, frames from 32 again):
///   every scan compares the 32 header bytes; on a change the old cycle's
///   still-valid tail is drained first, then the new cycle is read from frame 1;
/// - truncation below the scan position: uncommitted frames are dropped; if
///   committed frames were cut, that cycle is retired until a new header;
/// - sector padding (`synchronous=FULL` on a device without powersafe
///   overwrite): SQLite repeats the commit frame up to a sector boundary; a
///   one-frame "transaction" identical to the previous commit frame (same page,
///   size and bytes) right after it is recognised as padding and not emitted.
#[derive(Clone)]
pub struct WalTracker {
    state: State,
    stats: WalStats,
}

impl Default for WalTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl WalTracker {
    /// A tracker that will emit every committed transaction in the file.
    pub fn new() -> Self {
        Self {
            state: State::Empty,
            stats: WalStats::default(),
        }
    }

    /// Forgets everything: the next scan reads the file from its header and
    /// emits every committed transaction in it (e.g. at mount, to reconcile
    /// with the journal; the caller deduplicates).
    pub fn reset_to_start(&mut self) {
        self.state = State::Empty;
    }

    pub fn stats(&self) -> WalStats {
        self.stats
    }

    /// Offset of the first byte not yet consumed (0 without a header).
    pub fn position(&self) -> u64 {
        match &self.state {
            State::Active(c) => c.pos(),
            _ => 0,
        }
    }

    /// Offset just past the last commit frame emitted (0 without a header).
    pub fn committed_position(&self) -> u64 {
        match &self.state {
            State::Active(c) => c.commit_end,
            _ => 0,
        }
    }

    /// The current cycle's header, if any.
    pub fn header(&self) -> Option<WalHeader> {
        match &self.state {
            State::Active(c) => Some(c.hdr),
            _ => None,
        }
    }

    /// Records a write of `len` bytes at `offset` to the `-wal` file and says
    /// whether a [`WalTracker::scan`] could now find a new commit. No I/O.
    /// Must be called for every write, including those the caller does not
    /// scan after: a write below the scan position into uncommitted frames
    /// moves the position back.
    pub fn note_write(&mut self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let end = offset.saturating_add(len);
        let c = match &mut self.state {
            State::Active(c) => c,
            // No usable header yet: anything that reaches the header end may
            // be what makes the file usable.
            _ => return end >= WAL_HEADER_LEN as u64,
        };
        if offset < WAL_HEADER_LEN as u64 {
            return true; // header rewritten: a reset; scan compares it
        }
        let pos = c.pos();
        if offset < pos {
            if end > c.commit_end {
                let fs = c.hdr.frame_size();
                let first = (offset.max(c.commit_end) - c.commit_end) / fs;
                c.pending.truncate(first as usize);
                self.stats.rewinds += 1;
            }
            // Below the position, either pending frames being rewritten (we
            // rewound) or, after a reset we have not scanned yet, the new
            // cycle's frames: either way let scan look.
            return true;
        }
        write_may_complete_frame(offset, len, c.hdr.page_size)
    }

    /// Forgets the frames read past the last commit, so the next scan reads
    /// them again. For a reader that does not see the writes (a tailer): an
    /// uncommitted frame it read may have been rewritten since.
    pub fn rewind_pending(&mut self) {
        if let State::Active(c) = &mut self.state {
            c.pending.clear();
        }
    }

    /// Records that the file was truncated to `len` bytes.
    pub fn note_truncate(&mut self, len: u64) {
        self.apply_len(len);
    }

    fn apply_len(&mut self, len: u64) {
        if let State::Active(c) = &mut self.state {
            if len >= c.pos() {
                return;
            }
            self.stats.truncations += 1;
            if len >= c.commit_end {
                let keep = (len - c.commit_end) / c.hdr.frame_size();
                c.pending.truncate(keep as usize);
            } else {
                self.state = State::Retired(c.raw);
            }
        }
    }

    /// Reads what is new in the file and returns the transactions whose commit
    /// frame became valid since the last scan, in commit order. Reads the 32
    /// header bytes, then only frames at or after the position.
    pub fn scan<R: ReadAt + ?Sized>(&mut self, src: &R) -> io::Result<Vec<WalTxn>> {
        self.scan_limited(src, usize::MAX)
    }

    /// Like [`WalTracker::scan`], but stops right after the first committed
    /// transaction it finds, so that the caller can take it back with
    /// [`WalTracker::undo_last`] if it cannot record it. Call until `None`.
    pub fn scan_next<R: ReadAt + ?Sized>(&mut self, src: &R) -> io::Result<Option<WalTxn>> {
        Ok(self.scan_limited(src, 1)?.pop())
    }

    /// Takes back the transaction the last [`WalTracker::scan_next`] returned:
    /// the tracker stands again where it stood before that transaction's
    /// first frame (position and checksum chain), so the next scan reads it
    /// again from the file, or whatever SQLite wrote over it meanwhile (after a
    /// failed commit SQLite rewrites the same frames). Nothing else changes.
    pub fn undo_last(&mut self) {
        if let State::Active(c) = &mut self.state {
            if let Some(u) = c.undo.take() {
                c.commit_end = u.commit_end;
                c.commit_cksum = u.commit_cksum;
                c.last_commit = u.last_commit;
                c.pending.clear();
                self.stats.txns -= 1;
            }
        }
    }

    fn scan_limited<R: ReadAt + ?Sized>(
        &mut self,
        src: &R,
        limit: usize,
    ) -> io::Result<Vec<WalTxn>> {
        if let State::Active(c) = &mut self.state {
            c.undo = None;
        }
        let mut out = Vec::new();
        let len = src.size()?;
        self.apply_len(len);
        let mut raw = [0u8; WAL_HEADER_LEN];
        if read_full_at(src, &mut raw, 0)? < WAL_HEADER_LEN {
            return Ok(out);
        }
        let same = match &self.state {
            State::Active(c) => c.raw == raw,
            State::Retired(r) => *r == raw,
            State::Empty => false,
        };
        if same {
            if let State::Active(c) = &mut self.state {
                c.scan_frames(src, len, limit, &mut out, &mut self.stats)?;
            }
            return Ok(out);
        }
        // A new header. Frames of the old cycle beyond our position that were
        // committed before the reset and not overwritten yet are still valid
        // under the old salts: take them first (the next scan comes back for
        // more of them, or moves on to the new cycle).
        if let State::Active(old) = &mut self.state {
            old.scan_frames(src, len, limit, &mut out, &mut self.stats)?;
            if out.len() >= limit {
                return Ok(out);
            }
        }
        self.state = match WalHeader::parse(&raw) {
            Ok(hdr) => {
                self.stats.cycles += 1;
                let mut c = Cycle {
                    raw,
                    hdr,
                    commit_end: WAL_HEADER_LEN as u64,
                    commit_cksum: hdr.checksum,
                    pending: Vec::new(),
                    last_commit: None,
                    undo: None,
                };
                c.scan_frames(src, len, limit, &mut out, &mut self.stats)?;
                State::Active(c)
            }
            // Not (yet) a valid header: nothing in the file is readable.
            Err(_) => State::Empty,
        };
        Ok(out)
    }
}

impl Cycle {
    fn pos(&self) -> u64 {
        self.commit_end + self.pending.len() as u64 * self.hdr.frame_size()
    }

    fn chain(&self) -> Cksum {
        self.pending.last().map_or(self.commit_cksum, |p| p.cksum)
    }

    fn frame_number(&self, offset: u64) -> u32 {
        ((offset - WAL_HEADER_LEN as u64) / self.hdr.frame_size() + 1) as u32
    }

    fn scan_frames<R: ReadAt + ?Sized>(
        &mut self,
        src: &R,
        len: u64,
        limit: usize,
        out: &mut Vec<WalTxn>,
        stats: &mut WalStats,
    ) -> io::Result<()> {
        let fs = self.hdr.frame_size();
        let be = self.hdr.big_endian();
        loop {
            if out.len() >= limit {
                return Ok(());
            }
            let pos = self.pos();
            if pos.saturating_add(fs) > len {
                return Ok(());
            }
            let mut buf = vec![0u8; fs as usize];
            if read_full_at(src, &mut buf, pos)? < buf.len() {
                return Ok(()); // shrank under us
            }
            let head: &[u8; FRAME_HEADER_LEN] = buf[..FRAME_HEADER_LEN].try_into().unwrap();
            let fh = FrameHeader::parse(head);
            if fh.salt1 != self.hdr.salt1 || fh.salt2 != self.hdr.salt2 || fh.pgno == 0 {
                return Ok(());
            }
            let c = wal_checksum(be, &buf[..8], self.chain());
            let c = wal_checksum(be, &buf[FRAME_HEADER_LEN..], c);
            if c != fh.checksum {
                return Ok(());
            }
            stats.frames += 1;
            let data = Bytes::from(buf).slice(FRAME_HEADER_LEN..);
            self.pending.push(Pending {
                pgno: fh.pgno,
                data,
                cksum: c,
            });
            if fh.is_commit() {
                self.commit(fh.db_size_after_commit, out, stats);
            }
        }
    }

    fn commit(&mut self, db_size: u32, out: &mut Vec<WalTxn>, stats: &mut WalStats) {
        let undo = Undo {
            commit_end: self.commit_end,
            commit_cksum: self.commit_cksum,
            last_commit: self.last_commit.clone(),
        };
        let first_frame = self.frame_number(self.commit_end);
        let frames = std::mem::take(&mut self.pending);
        let last = frames.last().expect("commit frame is pending");
        self.commit_end += frames.len() as u64 * self.hdr.frame_size();
        self.commit_cksum = last.cksum;
        let commit_frame = first_frame + frames.len() as u32 - 1;
        let is_padding = frames.len() == 1
            && self.last_commit.as_ref().is_some_and(|p| {
                p.pgno == last.pgno && p.db_size == db_size && p.data == last.data
            });
        self.last_commit = Some(LastCommit {
            pgno: last.pgno,
            db_size,
            data: last.data.clone(),
        });
        if is_padding {
            stats.padding_frames += 1;
            return;
        }
        let mut pages = BTreeMap::new();
        for f in frames {
            if f.pgno <= db_size {
                pages.insert(f.pgno, f.data);
            }
        }
        stats.txns += 1;
        self.undo = Some(undo);
        out.push(WalTxn {
            pages,
            db_size_pages: db_size,
            page_size: self.hdr.page_size,
            salt1: self.hdr.salt1,
            salt2: self.hdr.salt2,
            checkpoint_seq: self.hdr.checkpoint_seq,
            first_frame,
            commit_frame,
        });
    }
}

#[cfg(test)]
mod tests;
