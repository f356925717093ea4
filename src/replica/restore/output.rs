//! Writing the restored file: the temporary output, the snapshot streamed
//! into it frame by frame, segments applied with their checksums checked.

use super::*;

/// The file being built: a temporary file next to FILE, removed on drop
/// unless committed, and the running page hashes of its content.
pub(super) struct Output {
    pub(super) tmp: PathBuf,
    pub(super) file: File,
    pub(super) hashes: PageHashes,
    pub(super) page_size: u32,
    pub(super) committed: bool,
}

impl Output {
    pub(super) fn create(out: &Path, page_size: u32) -> Result<Output, RestoreError> {
        let dir = parent_dir(out);
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let hashes = PageHashes::new(page_size).map_err(|e| RestoreError::Mismatch {
            key: out.display().to_string(),
            why: e.to_string(),
        })?;
        let mut attempt = 0;
        loop {
            let tmp = dir.join(format!(
                ".{name}.restore-{}-{:08x}.tmp",
                std::process::id(),
                rand::random::<u32>()
            ));
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(file) => {
                    return Ok(Output {
                        tmp,
                        file,
                        hashes,
                        page_size,
                        committed: false,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => {
                    attempt += 1;
                }
                Err(e) => return Err(io_err(&tmp, "create temporary file")(e)),
            }
        }
    }

    pub(super) fn ps(&self) -> u64 {
        u64::from(self.page_size)
    }

    /// Writes pages `first..` (consecutive) at the end of the image.
    pub(super) fn append_pages(&mut self, first: u32, pages: &[Bytes]) -> Result<(), RestoreError> {
        if pages.is_empty() {
            return Ok(());
        }
        let last = first + pages.len() as u32 - 1;
        let mut off = u64::from(first - 1) * self.ps();
        for p in pages {
            self.file
                .write_all_at(p, off)
                .map_err(io_err(&self.tmp, "write"))?;
            off += p.len() as u64;
        }
        let it = pages
            .iter()
            .enumerate()
            .map(|(i, p)| (first + i as u32, &p[..]));
        self.hashes
            .apply(it, last)
            .map_err(|e| self.internal(e.to_string()))?;
        Ok(())
    }

    /// Applies one committed transaction: resize, then write its pages.
    pub(super) fn apply_txn(&mut self, t: &codec::Txn) -> Result<u64, RestoreError> {
        self.file
            .set_len(u64::from(t.db_size_pages) * self.ps())
            .map_err(io_err(&self.tmp, "resize"))?;
        for (pgno, data) in &t.pages {
            self.file
                .write_all_at(data, u64::from(pgno - 1) * self.ps())
                .map_err(io_err(&self.tmp, "write"))?;
        }
        let it = t.pages.iter().map(|(p, d)| (*p, &d[..]));
        self.hashes
            .apply(it, t.db_size_pages)
            .map_err(|e| self.internal(e.to_string()))
    }

    pub(super) fn internal(&self, why: String) -> RestoreError {
        RestoreError::Mismatch {
            key: self.tmp.display().to_string(),
            why,
        }
    }

    /// Re-hashes the file, fsyncs it and moves it to `out`.
    pub(super) fn commit(mut self, out: &Path, force: bool) -> Result<(), RestoreError> {
        self.file.sync_all().map_err(io_err(&self.tmp, "fsync"))?;
        let on_disk = PageHashes::from_file(&self.tmp, self.page_size)
            .map_err(io_err(&self.tmp, "re-read"))?;
        if on_disk.checksum() != self.hashes.checksum()
            || on_disk.page_count() != self.hashes.page_count()
        {
            return Err(self.internal(format!(
                "the file reads back as checksum {:016x} ({} pages), {:016x} ({} pages) was written",
                on_disk.checksum(),
                on_disk.page_count(),
                self.hashes.checksum(),
                self.hashes.page_count()
            )));
        }
        if force {
            // Leftover sidecars of the file being replaced would be applied
            // over the restored content by the next SQLite that opens it.
            for s in sidecars(out) {
                match std::fs::remove_file(&s) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&s, "remove stale sidecar")(e)),
                }
            }
            std::fs::rename(&self.tmp, out).map_err(io_err(out, "rename into place"))?;
        } else {
            // link(2) fails if `out` appeared meanwhile: never a silent overwrite.
            match std::fs::hard_link(&self.tmp, out) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&self.tmp);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(RestoreError::Exists {
                        path: out.display().to_string(),
                    })
                }
                Err(_) if std::fs::symlink_metadata(out).is_ok() => {
                    return Err(RestoreError::Exists {
                        path: out.display().to_string(),
                    })
                }
                // A filesystem without hard links.
                Err(_) => {
                    std::fs::rename(&self.tmp, out).map_err(io_err(out, "rename into place"))?
                }
            }
        }
        self.committed = true;
        let dir = parent_dir(out);
        if let Ok(d) = File::open(&dir) {
            d.sync_all().map_err(io_err(&dir, "fsync directory"))?;
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

pub(super) enum SinkError {
    Codec(CodecError),
    Io(RestoreError),
}

impl From<CodecError> for SinkError {
    fn from(e: CodecError) -> Self {
        SinkError::Codec(e)
    }
}

impl From<RestoreError> for SinkError {
    fn from(e: RestoreError) -> Self {
        SinkError::Io(e)
    }
}

/// Decodes a snapshot fed in order, chunk by chunk.
pub(super) struct SnapshotSink {
    /// Index and footer as fetched first; the streamed tail must equal them,
    /// so the index used to decode is covered by the whole-file CRC.
    pub(super) suffix: Bytes,
    pub(super) reader: SnapshotReader,
    pub(super) next_frame: u32,
    /// Bytes not consumed yet, starting at object offset `buf_start`.
    pub(super) buf: Vec<u8>,
    pub(super) buf_start: u64,
    pub(super) crc: crc32fast::Hasher,
    pub(super) size: u64,
}

impl SnapshotSink {
    pub(super) fn feed(&mut self, out: &mut Output, chunk: &[u8]) -> Result<(), SinkError> {
        // Whole-file CRC over every byte but the last four (the CRC itself).
        let chunk_start = self.buf_start + self.buf.len() as u64;
        let crc_end = self.size - 4;
        if chunk_start < crc_end {
            let n = ((crc_end - chunk_start) as usize).min(chunk.len());
            self.crc.update(&chunk[..n]);
        }
        self.buf.extend_from_slice(chunk);
        let ps = out.page_size as usize;
        let g = u32::from(self.reader.header().pages_per_frame);
        while let Some(e) = self.reader.index().get(self.next_frame as usize).copied() {
            let end = e.offset + u64::from(e.len);
            if end > self.buf_start + self.buf.len() as u64 {
                break;
            }
            let s = (e.offset - self.buf_start) as usize;
            let frame = &self.buf[s..s + e.len as usize];
            let pages = self.reader.decode_frame(self.next_frame, frame)?;
            debug_assert!(pages.iter().all(|p| p.len() == ps));
            out.append_pages(self.next_frame * g + 1, &pages)?;
            self.next_frame += 1;
            // Drop what is consumed.
            let consumed = (end - self.buf_start) as usize;
            self.buf.drain(..consumed);
            self.buf_start = end;
        }
        Ok(())
    }

    pub(super) fn finish(self, out: &Output) -> Result<(), SinkError> {
        let h = self.reader.header();
        if (self.next_frame as usize) < self.reader.index().len() {
            return Err(CodecError::Truncated {
                what: "snapshot frames",
                needed: self.size,
                available: self.buf_start + self.buf.len() as u64,
            }
            .into());
        }
        if out.hashes.page_count() != h.page_count {
            return Err(CodecError::PageCountMismatch {
                declared: h.page_count,
                written: u64::from(out.hashes.page_count()),
            }
            .into());
        }
        if out.hashes.checksum() != h.db_checksum {
            return Err(CodecError::DbChecksum {
                stored: h.db_checksum,
                computed: out.hashes.checksum(),
            }
            .into());
        }
        // The tail still buffered ends with the stored CRC.
        let tail = &self.buf;
        if tail.len() < 4 {
            return Err(CodecError::Truncated {
                what: "snapshot",
                needed: self.size,
                available: self.buf_start + tail.len() as u64,
            }
            .into());
        }
        if !tail.ends_with(&self.suffix) {
            return Err(CodecError::BadHeader("snapshot index changed between reads").into());
        }
        let stored = u32::from_be_bytes(tail[tail.len() - 4..].try_into().expect("4 bytes"));
        let computed = self.crc.finalize();
        if stored != computed {
            return Err(CodecError::Checksum {
                region: codec::Region::File,
                stored,
                computed,
            }
            .into());
        }
        Ok(())
    }
}

/// One segment to apply, and where to stop.
pub(super) struct SegmentJob {
    pub(super) key: String,
    pub(super) db: String,
    pub(super) page_size: u32,
    pub(super) key_from: u64,
    pub(super) key_to: u64,
    /// The chain's txid before this segment.
    pub(super) at: u64,
    pub(super) epoch_owner: Option<u64>,
    pub(super) goal: u64,
    pub(super) time_ms: Option<i64>,
}

pub(super) struct SegmentDone {
    pub(super) applied: u64,
    pub(super) last_txid: u64,
    pub(super) last_ms: i64,
    /// A transaction committed after the target time was reached.
    pub(super) time_reached: bool,
}

impl SegmentJob {
    pub(super) fn corrupt(&self, source: CodecError) -> RestoreError {
        RestoreError::Corrupt {
            key: self.key.clone(),
            what: "segment",
            source,
        }
    }

    pub(super) fn apply(
        &self,
        out: &mut Output,
        bytes: &[u8],
    ) -> Result<SegmentDone, RestoreError> {
        let mut r = SegmentReader::new(bytes).map_err(|e| self.corrupt(e))?;
        let h = r.header().clone();
        let info = SegInfo {
            key: self.key.clone(),
            from: self.key_from,
            to: self.key_to,
            size: bytes.len() as u64,
        };
        check_segment_key(&info, &h, &self.db, self.page_size)?;
        let mut chain = Chain::new(self.at, out.hashes.checksum());
        chain.enters(
            &self.key,
            (h.txid_from, h.txid_to),
            h.epoch,
            h.pre_checksum,
            self.epoch_owner,
        )?;
        let mut done = SegmentDone {
            applied: 0,
            last_txid: self.at,
            last_ms: 0,
            time_reached: false,
        };
        let mut whole = true;
        for t in &mut r {
            let t = t.map_err(|e| self.corrupt(e))?;
            if t.txid <= self.at {
                continue; // already in the snapshot this segment is entered from
            }
            if let Some(limit) = self.time_ms {
                if t.timestamp_ms > limit {
                    done.time_reached = true;
                    whole = false;
                    break;
                }
            }
            // The segment's epoch was checked on entry.
            chain.apply(&self.key, &t, None, |t| out.apply_txn(t).map(Some))?;
            done.applied += 1;
            done.last_txid = t.txid;
            done.last_ms = t.timestamp_ms;
            if t.txid >= self.goal {
                whole = t.txid == h.txid_to;
                break;
            }
        }
        if whole {
            // Read to the end: check that header and body agree throughout.
            r.finish().map_err(|e| self.corrupt(e))?;
        }
        Ok(done)
    }
}
